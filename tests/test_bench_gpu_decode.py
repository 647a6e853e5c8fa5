"""bench/gpu_decode.py's harness on the CPU (the device numbers come from the H200): the kernel
part runs every variant (the selection's pages equal torch's, the attention the reference's) with
the blocked top-k variants at a length that has them, Quest's ``refine`` step both ways, and the end-to-end part runs HF and kvsift
on the tiny random model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_decode", BENCH / "gpu_decode.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kernel_harness_on_the_cpu(tmp_path):
    out = tmp_path / "k.json"
    assert _load().main(["--device", "cpu", "--contexts", "16384", "--budgets", "256", "--batches", "1",
                         "--reps", "1", "--max-layers", "1", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    names = {r["name"] for r in d["kernels"]}
    for want in ("dense_gqa", "sel/quest/256", "sel/tokens/256", "sel/tokens_cache_new/256",
                 "sel/tokens_cache_reused/256", "topk_blocked512/256", "sel/quest_blocked512/256",
                 "topk_one/256", "sel/quest_one/256", "topk_tokens/256", "topk_tokens_sort/256",
                 "sel/quest_refine2/256", "sel/quest_refine4/256", "sel/quest_refine4_torch/256", "slot_scores4/256",
                 "sel/quest_refine4_votes/256", "slot_votes4/256", "topk_cand4/256", "pick_slots4/256",
                 "sel/tokens_radix/256", "topk_tokens_radix4096/256", "topk_cand4_radix/256"):
        assert want in names, (want, sorted(names))
    assert all(r["eager_ms"] > 0 for r in d["kernels"] if r.get("eager_ms") is not None)
    (checks,) = d["checks"]
    assert checks["sel_quest_pages_vs_torch"] == 0.0 and checks["sel_quest_attn_vs_ref"] < 1e-2
    assert checks["sel_quest_refine_vs_ref"] < 1e-2    # refine's kernel path attends what its float32 reference does
    assert checks["sel_quest_refine_votes_vs_ref"] < 1e-2   # and with refine_rank="votes"


def test_e2e_harness_on_the_tiny_model(tmp_path):
    out = tmp_path / "e.json"
    assert _load().main(["--device", "cpu", "--skip-kernels", "--e2e", "--e2e-tiny", "--e2e-layers", "2",
                         "--e2e-contexts", "256", "--e2e-batches", "1", "--e2e-new-tokens", "3",
                         "--e2e-methods", "full,tokenselect:64:reuse_threshold=-1.0,tokenselect:64@radix",
                         "--out", str(out)]) == 0
    rows = {r["system"]: r for r in json.loads(out.read_text())["e2e"]}
    assert set(rows) == {"hf", "full", "tokenselect:64:reuse_threshold=-1.0", "tokenselect:64@radix"}
    assert all("error" not in r and r["ms_per_token"] > 0 for r in rows.values())
    assert rows["tokenselect:64:reuse_threshold=-1.0"]["method_stats"]["reuse_rate"] > 0.5

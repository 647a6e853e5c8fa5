"""Triton kernels compiled for a Hopper target (sm_90) without a GPU: Triton's code generation and
``ptxas`` run wherever Triton's NVIDIA backend is installed (skipped elsewhere, as in CI on the CPU
wheel), so a kernel that would not compile on the H200 fails here before a device session. Every
kernel that takes ``PDL`` (kvsift/kernels/_triton.py) with and without it: its PTX holds the
device wait and the trigger (``griddepcontrol``) exactly when it is on; and the quantized decode
kernel on its two paths."""

from __future__ import annotations

import importlib

import pytest

from kvsift.kernels import _triton

_BF = "*bf16"
# (module, kernel, pointer argument types, constexprs, float arguments, num_warps): the shapes and
# default launch settings of the 8B model's decode at 128k (32 query heads over 8 KV heads of 128
# channels, pages of 16, a budget of 2,048 tokens)
_KERNELS = [
    ("token_votes", "_scores_kernel", {"q_ptr": _BF, "k_ptr": _BF, "kp_ptr": "*i32", "lim_ptr": "*i64", "skip_ptr": "*i1",
                                       "sl_ptr": "*i64", "sc_ptr": "*fp32", "st_ptr": "*fp32"},
     dict(HK=8, G=4, G_P=16, D=128, BLOCK_D=128, BLOCK_N=64, IEEE=False, UPCAST=False, HAS_SKIP=True, SLOTS=False),
     ("qk_scale",), 4),
    ("token_votes", "_scores_kernel", {"q_ptr": _BF, "k_ptr": _BF, "kp_ptr": "*i32", "lim_ptr": "*i64", "skip_ptr": "*i1",
                                       "sl_ptr": "*i64", "sc_ptr": "*fp32", "st_ptr": "*fp32"},
     dict(HK=8, G=4, G_P=16, D=128, BLOCK_D=128, BLOCK_N=64, IEEE=False, UPCAST=False, HAS_SKIP=False, SLOTS=True),
     ("qk_scale",), 4),
    ("token_votes", "_scores_kernel", {"q_ptr": _BF, "k_ptr": _BF, "kp_ptr": "*i32", "lim_ptr": "*i64", "skip_ptr": "*i1",
                                       "sl_ptr": "*i64", "sc_ptr": "*fp32", "st_ptr": "*fp32"},
     dict(HK=8, G=4, G_P=16, D=128, BLOCK_D=128, BLOCK_N=64, IEEE=False, UPCAST=False, HAS_SKIP=False, SLOTS=True,
          PAGE=16), ("qk_scale",), 4),
    ("token_votes", "_votes_kernel", {"sc_ptr": "*fp32", "st_ptr": "*fp32", "skip_ptr": "*i1", "out_ptr": "*fp32"},
     dict(HK=8, G=4, G_P=16, G_V=4, NP_P=64, BLOCK_V=512, HAS_SKIP=True), ("fill",), 4),
    ("slot_scores", "_slot_scores_kernel", {"q_ptr": _BF, "k_ptr": _BF, "kp_ptr": "*i32", "sl_ptr": "*i64",
                                            "out_ptr": "*fp32"},
     dict(HK=8, G=4, G_P=16, D=128, BLOCK_D=128, BLOCK_N=64, MEAN=False, IEEE=False, UPCAST=False), (), 4),
    ("slot_scores", "_slot_scores_kernel", {"q_ptr": _BF, "k_ptr": _BF, "kp_ptr": "*i32", "sl_ptr": "*i64",
                                            "out_ptr": "*fp32"},
     dict(HK=8, G=4, G_P=16, D=128, BLOCK_D=128, BLOCK_N=64, MEAN=False, IEEE=False, UPCAST=False, PAGE=16), (), 4),
    ("slot_scores", "_pick_slots_kernel", {"at_ptr": "*i64", "c_ptr": "*i64", "t_ptr": "*i64", "out_ptr": "*i64"},
     dict(HK=8, PAGE=16, TAIL=True, BLOCK=1024), (), 4),
    ("chunk_scores", "_chunk_scores_kernel", {"q_ptr": _BF, "lo_ptr": _BF, "hi_ptr": _BF, "sc_ptr": "*fp32",
                                              "out_ptr": "*fp32", "lim_ptr": "*i64", "val_ptr": "*i1"},
     dict(HK=8, G=4, G_P=16, D=128, BLOCK_D=128, BLOCK_N=128, QUEST=True, REDUCE_MAX=True, IEEE=False, UPCAST=False,
          DOT=True, SCALED=False, HAS_LIMIT=True, HAS_VALID=False), (), 4),
    ("topk_select", "_topk_select_kernel", {"s_ptr": "*fp32", "out_ptr": "*i64", "skip_ptr": "*i1", "tail_ptr": "*i64"},
     dict(HK=8, BLOCK_N=8192, BLOCK_K=128, HAS_SKIP=True, HAS_TAIL=True), (), 8),
    ("topk_select", "_topk_select_kernel_i32", {"s_ptr": "*fp32", "out_ptr": "*i64", "skip_ptr": "*i1",
                                                "tail_ptr": "*i64"},
     dict(HK=8, BLOCK_N=8192, BLOCK_K=128, HAS_SKIP=True, HAS_TAIL=True), (), 8),
    ("topk_select", "_topk_blocks_kernel", {"s_ptr": "*fp32", "si_ptr": "*i64", "ci_ptr": "*i64", "cv_ptr": "*fp32",
                                            "skip_ptr": "*i1"},
     dict(HK=8, NB=8, BLK=16384, BLOCK_K=2048, HAS_SKIP=True, HAS_IDX=False), (), 8),
    ("topk_select", "_topk_blocks_kernel", {"s_ptr": "*fp32", "si_ptr": "*i64", "ci_ptr": "*i64", "cv_ptr": "*fp32",
                                            "skip_ptr": "*i1"},
     dict(HK=8, NB=2, BLK=16384, BLOCK_K=2048, HAS_SKIP=True, HAS_IDX=True), (), 8),
    ("topk_select", "_topk_pick_kernel", {"ci_ptr": "*i64", "cv_ptr": "*fp32", "out_ptr": "*i64", "skip_ptr": "*i1",
                                          "tail_ptr": "*i64"},
     dict(HK=8, BLOCK_M=16384, BLOCK_K=2048, HAS_SKIP=True, HAS_TAIL=False), (), 8),
    ("sparse_decode_attention", "_sparse_decode_split_kernel",
     {"q_ptr": _BF, "k_ptr": _BF, "v_ptr": _BF, "idx_ptr": "*i64", "out_ptr": _BF, "po_ptr": "*fp32",
      "plse_ptr": "*fp32", "kp_ptr": "*i32", "qp_ptr": "*i64", "cnt_ptr": "*i32"},
     dict(HK=8, G=4, G_P=16, D=128, BLOCK_D=128, BLOCK_S=64, PAGE=16, DIRECT=False, IEEE=False, UPCAST=False,
          ALL=False, MASKPOS=False, HAS_CNT=False), ("qk_scale",), 4),
    ("sparse_decode_attention", "_merge_splits_kernel", {"po_ptr": "*fp32", "plse_ptr": "*fp32", "out_ptr": _BF,
                                                         "lse_ptr": "*fp32"},
     dict(D=128, BLOCK_D=32, NS_P=32, CHUNK=16, WRITE_LSE=False), (), 2),
]


@pytest.mark.skipif(not _triton.triton_has_pdl(), reason="needs a Triton with the NVIDIA backend and PDL")
@pytest.mark.parametrize("case", _KERNELS, ids=lambda c: f"{c[1]}{'-slots' if c[3].get('SLOTS') else ''}"
                                                     f"{'-pages' if c[3].get('PAGE', 1) > 1 and c[1] != '_sparse_decode_split_kernel' else ''}")
def test_kernels_compile_for_hopper_with_and_without_pdl(case, tmp_path, monkeypatch):
    """Code generation and ``ptxas`` for sm_90, no device: with ``PDL`` the PTX holds the wait and the
    trigger (``griddepcontrol``), without it none; the rest of each kernel is unchanged by it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))   # compile here, not from an earlier cache
    mod, name, ptrs, consts, floats, warps = case
    fn = getattr(importlib.import_module(f"kvsift.kernels.{mod}"), name)
    for on in (False, True):
        c = dict(consts, PDL=on)
        sig = {a: "constexpr" if a in c else ptrs.get(a, "fp32" if a in floats else "i32") for a in fn.arg_names}
        k = triton.compile(ASTSource(fn, sig, constexprs=c), target=GPUTarget("cuda", 90, 32),
                           options={"launch_pdl": on, "num_warps": warps})
        ptx = k.asm["ptx"]
        assert ptx.count("griddepcontrol.wait") == int(on) and ptx.count("griddepcontrol.launch_dependents") == int(on)
        assert k.asm.get("cubin"), "ptxas gave no binary"


# the quantized decode kernel takes no PDL, but its prologue is the shared one (_flash.group_offsets,
# since 2026-12-05): compiled for sm_90 on its two paths, the folded 4-bit one with its inline PTX and
# the slot-table one over 2-bit codes
_QUANT_PTRS = {"q_ptr": _BF, "kc_ptr": "*u8", "ks_ptr": "*fp16", "kz_ptr": "*fp16", "vc_ptr": "*u8",
               "vs_ptr": "*fp16", "vz_ptr": "*fp16", "rk_ptr": _BF, "rv_ptr": _BF, "rs_ptr": "*i64",
               "idx_ptr": "*i64", "out_ptr": _BF, "po_ptr": "*fp32", "plse_ptr": "*fp32", "kp_ptr": "*i32",
               "qp_ptr": "*i64", "cnt_ptr": "*i32"}
_QUANT_BASE = dict(HK=8, G=4, G_P=16, D=128, BLOCK_D=128, KGROUP=64, DIRECT=False, IEEE=False, UPCAST=False,
                   HAS_CNT=False, FAST=True, ROUND_BF16=False, HALVES=1, MAGIC=True, I32=True, OFFSET=False)


@pytest.mark.skipif(not _triton.triton_has_pdl(), reason="needs a recent Triton with the NVIDIA backend")
@pytest.mark.parametrize("path", [
    dict(BLOCK_S=64, BITS=4, PER=2, LEVELS=15, VGROUP=128, NVG=1, ALL=True, FOLD=True, ASM=True, warps=2, stages=3),
    dict(BLOCK_S=32, BITS=2, PER=4, LEVELS=3, VGROUP=32, NVG=4, ALL=False, FOLD=False, ASM=False, warps=4, stages=2)],
    ids=["fold-int4-asm", "slots-int2"])
def test_quant_decode_kernel_compiles_for_hopper(path, tmp_path, monkeypatch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kvsift.kernels.quant_decode_attention import _quant_decode_split_kernel as fn

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    c = dict(_QUANT_BASE, **{k: v for k, v in path.items() if k not in ("warps", "stages")})
    sig = {a: "constexpr" if a in c else _QUANT_PTRS.get(a, "fp32" if a == "qk_scale" else "i32")
           for a in fn.arg_names}
    k = triton.compile(ASTSource(fn, sig, constexprs=c), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": path["warps"], "num_stages": path["stages"]})
    assert k.asm.get("cubin") and ("prmt.b32 t0" in k.asm["ptx"]) == path["ASM"]   # the inline unpack, where asked


# the radix top-k (kvsift/kernels/topk_radix.py) takes no PDL: its kernels compiled for sm_90 at
# TokenSelect's shape (8 KV heads, rows of 131,072 in blocks of 4,096), each histogram level
_RADIX = [("_radix_hist_kernel", dict(LEVEL=0, SHIFT=21, BINS=2048, TOP=32, BASE=0)),
          ("_radix_hist_kernel", dict(LEVEL=1, SHIFT=10, BINS=2048, TOP=21, BASE=2048)),
          ("_radix_hist_kernel", dict(LEVEL=2, SHIFT=0, BINS=1024, TOP=10, BASE=4096)),
          ("_radix_pick_kernel", dict(NBLK_P=32, FILL=1024, WRITE=False, HAS_TAIL=True)),
          ("_radix_pick_kernel", dict(NBLK_P=32, FILL=1024, WRITE=True, HAS_TAIL=True))]


@pytest.mark.skipif(not _triton.triton_has_pdl(), reason="needs a recent Triton with the NVIDIA backend")
@pytest.mark.parametrize("name,consts", _RADIX, ids=[f"{n}{c.get('LEVEL', '')}{c.get('WRITE', '')}" for n, c in _RADIX])
def test_radix_topk_kernels_compile_for_hopper(name, consts, tmp_path, monkeypatch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    fn = getattr(importlib.import_module("kvsift.kernels.topk_radix"), name)
    c = dict(consts, HK=8, NBLK=32, BLK=4096, HAS_SKIP=True)
    ptrs = {"s_ptr": "*fp32", "skip_ptr": "*i1", "hist_ptr": "*i32", "cnt_ptr": "*i32", "out_ptr": "*i64",
            "tail_ptr": "*i64"}
    sig = {a: "constexpr" if a in c else ptrs.get(a, "i32") for a in fn.arg_names}
    k = triton.compile(ASTSource(fn, sig, constexprs=c), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert k.asm.get("cubin"), "ptxas gave no binary"



# kernels without PDL, for the 8B shape in bf16: the static decode step's one-launch KV write (it runs
# before the layer's attention reads what it wrote) and the fused decode's rotary embedding of
# queries and keys in one launch, with its exact rounding
_PLAIN = [
    ("kv_append", "_kv_append_kernel", {"k_ptr": _BF, "v_ptr": _BF, "p_ptr": "*i32", "slot_ptr": "*i64",
                                        "key_ptr": _BF, "val_ptr": _BF, "pos_ptr": "*i32"},
     dict(H=8, D=128, BLOCK_R=64, BLOCK_D=128), 4),
    ("rope", "_rope_kernel", {a: _BF for a in ("q_ptr", "qo_ptr", "k_ptr", "ko_ptr", "c_ptr", "s_ptr")},
     dict(HALF=64, BLOCK=64, EXACT=True, BF16=True), 1),
]


@pytest.mark.skipif(not _triton.triton_has_pdl(), reason="needs a recent Triton with the NVIDIA backend")
@pytest.mark.parametrize("case", _PLAIN, ids=lambda c: c[1])
def test_plain_kernels_compile_for_hopper(case, tmp_path, monkeypatch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    mod, name, ptrs, c, warps = case
    fn = getattr(importlib.import_module(f"kvsift.kernels.{mod}"), name)
    sig = {a: "constexpr" if a in c else ptrs.get(a, "i32") for a in fn.arg_names}
    k = triton.compile(ASTSource(fn, sig, constexprs=c), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert k.asm.get("cubin"), "ptxas gave no binary"

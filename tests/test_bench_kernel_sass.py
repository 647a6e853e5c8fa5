"""bench/kernel_sass.py: the opcode count of ``cuobjdump -sass`` text (the disassembly itself needs
CUDA), and its refusal without CUDA."""

from __future__ import annotations

import torch

from bench import kernel_sass

_SASS = """
        code for sm_90
                Function : _quant_decode_split_kernel
        /*0000*/                   LDC R1, c[0x0][0x28] ;                        /* 0x00000a00ff017b82 */
        /*0010*/                   S2R R0, SR_TID.X ;                            /* 0x0000000000007919 */
        /*0020*/              @!P0 LDS.U8 R4, [R2+0x10] ;                        /* 0x0000100002047984 */
        /*0030*/                   LDS.U8 R5, [R2+0x11] ;                        /* 0x0000110002057984 */
        /*0040*/                   HMMA.16816.F32 R8, R12, R16, R8 ;             /* 0x000000100c08723c */
        /*0050*/                   PRMT R6, R4, 0x7604, R5 ;                     /* 0x0000760404067816 */
"""


def test_opcode_counts_strip_modifiers_and_predicates():
    ops = kernel_sass.opcode_counts(_SASS)
    assert ops == {"LDC": 1, "S2R": 1, "LDS": 2, "HMMA": 1, "PRMT": 1}


def test_kernel_sass_needs_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        import pytest
        pytest.skip("CUDA is present: the script would compile and disassemble for real")
    assert kernel_sass.main(["--out", str(tmp_path / "s.json")]) == 2
    assert "needs CUDA" in capsys.readouterr().err

"""Launch settings of the Triton attention kernels: tiles, warps and stages per kernel, the
queries up to which the forward takes the split-KV decode path, and its split count.

Self-contained (torch and triton only), and the one source of these numbers: the launchers
(flash_attention.py) and the ahead-of-time case list (flash_attention.AOT_CASES) both call
``attention_launch_settings``, so what tests/test_triton_attention.py compiles for sm_80 and
sm_90 (and checks for register spills) is what runs there.

    attention_launch_settings(kernel, head_dim, arch, rows=, elem_bytes=) -> AttentionLaunch
        kernel: one of KERNELS; arch: the device capability, None under the interpreter
    attention_bwd_structure(head_dim, arch, elem_bytes=) -> "split" | "blocked"
        the backward's structure (BWD_STRUCTURES): "split" unless the tuned table holds a
        bwd_blocked winner for this capability and head_dim
    num_splits_heuristic(n_programs, n_key_blocks, num_sms) -> key splits of a decode step
        With slots = num_sms * DECODE_PROGRAMS_PER_SM programs resident at once and n programs
        unsplit: 1 when n >= 0.8 slots; else the smallest s whose wave efficiency
            eff(s) = n s / (ceil(n s / slots) * slots)
        is at least 0.85 * max eff over 1 <= s <= min(MAX_SPLITS, n_key_blocks, slots),
        counting only the s that shorten the longest split (ceil(blocks / s) < ceil(blocks /
        (s - 1))).
    DECODE_MAX_SEQLEN_Q: up to this many queries the forward takes the split-KV decode path.

Tuned settings: ``attention_tuned.json`` beside this file maps a GPU capability ("9.0") and a
head_dim ("128") to measured winners, ``{kernel: [block_m, block_n, num_warps, num_stages]}``,
written by ``python -m benchmarks.tune --winners tune.json`` from a GPU run's timings. An entry
replaces the rules below for 16-bit inputs on exactly that capability and head_dim (decode
keeps its rows-sized block_m), and a bwd_blocked entry also selects the blocked backward
there; everything else falls back to the rules. The table is data,
and what it names is compiled ahead of time like the rules' choices (flash_attention.AOT_CASES),
so an entry that spills fails the same test.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import NamedTuple

import torch
import triton

# Up to this many queries the forward takes the split-KV decode path: a 128-row prefill tile
# would be 1/128 .. 1/8 full and its grid (one program per head) far too small to fill a GPU
# while it streams the whole KV cache.
DECODE_MAX_SEQLEN_Q = 16
# Upper bound on the number of key splits: past 64, each split's fixed cost (Q load, fp32
# partial O write, combine read) outweighs the few key blocks it streams.
MAX_SPLITS = 64
# Decode programs resident per SM: 4 warps and (16..64 + 2 x 64) x 128 x 2 x stages bytes of
# shared memory leave room for at least two, and two per SM hide load latency better than
# one (flash-decoding with one program per SM streams the cache at only 60-75% of memory
# bandwidth).
DECODE_PROGRAMS_PER_SM = 2


class AttentionLaunch(NamedTuple):
    """Tile sizes, warps and pipeline stages of one attention kernel launch. block_n is unused
    (1) for the row kernels (combine, bwd_preprocess), block_m for combine."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


KERNELS = ("fwd", "decode", "combine", "bwd_preprocess", "bwd_dkdv", "bwd_dq", "bwd_blocked")
TUNED_KERNELS = ("fwd", "decode", "bwd_dkdv", "bwd_dq", "bwd_blocked")
# The backward's two structures: "split", a dK/dV kernel and a dQ kernel (attention_bwd.py,
# settings bwd_dkdv and bwd_dq); "blocked", one kernel whose programs do both roles
# (attention_bwd_blocked.py, settings bwd_blocked). Both follow the delta preprocess.
BWD_STRUCTURES = ("split", "blocked")
TUNED_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "attention_tuned.json")


@functools.lru_cache(maxsize=None)
def tuned_table() -> dict:
    """The measured winners in TUNED_PATH: {capability: {head_dim: {kernel: AttentionLaunch}}}
    (see the module docstring); an absent file is an empty table. Read once per process."""
    path = TUNED_PATH
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        raw = json.load(f)
    table = {}
    for cap, by_dim in raw.items():
        for dim, by_kernel in by_dim.items():
            for kernel, values in by_kernel.items():
                if kernel not in TUNED_KERNELS or len(values) != 4:
                    raise ValueError(f"{path}: {cap}/{dim}/{kernel}: expected a kernel of "
                                     f"{TUNED_KERNELS} and [block_m, block_n, warps, stages], "
                                     f"got {values!r}")
                table.setdefault(cap, {}).setdefault(int(dim), {})[kernel] = \
                    AttentionLaunch(*(int(v) for v in values))
    return table


def _tuned(kernel: str, head_dim: int, arch: tuple[int, int]) -> AttentionLaunch | None:
    return tuned_table().get(f"{arch[0]}.{arch[1]}", {}).get(head_dim, {}).get(kernel)


def attention_launch_settings(kernel: str, head_dim: int, arch: tuple[int, int] | None, *,
                              rows: int = 1, elem_bytes: int = 2) -> AttentionLaunch:
    """Block sizes, warps and stages of one kernel; the launchers and AOT_CASES both use it.

    ``arch`` is the device capability (``torch.cuda.get_device_capability``), None under the
    interpreter; ``rows`` (decode only) is Sq * group_size, the packed query rows of a kv head;
    ``elem_bytes`` the input element size (4 = fp32, accepted for correctness, not speed).
    The starting points are FlashAttention-2's tiles and those of Triton's fused-attention
    tutorial, kept where the ahead-of-time compile shows no register spills
    (tests/test_triton_attention.py).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    d = max(16, triton.next_power_of_2(head_dim))
    if arch is None:
        # Interpreter: programs run one at a time and each tile op is a numpy call, so tiles
        # are small enough to exercise multi-block loops, ragged edges and diagonal tiles on
        # short test sequences, and BLOCK_M != BLOCK_N so the diagonal logic is not symmetric.
        return {"fwd": AttentionLaunch(32, 16, 1, 1), "decode": AttentionLaunch(16, 16, 1, 1),
                "combine": AttentionLaunch(1, 1, 1, 1),
                "bwd_preprocess": AttentionLaunch(32, 1, 1, 1),
                "bwd_dkdv": AttentionLaunch(16, 32, 1, 1),
                "bwd_dq": AttentionLaunch(32, 16, 1, 1),
                "bwd_blocked": AttentionLaunch(16, 32, 1, 1)}[kernel]
    sm90 = arch[0] >= 9
    # sm_80 has 164 KB of shared memory per block, sm_86/89 only 99 KB: one stage fewer there.
    small_smem = arch[0] == 8 and arch[1] != 0
    big = d > 128  # 256 (and 192 padded to 256): correct, not tuned
    if kernel == "fwd":
        # FA2's tiles: 128 query rows x 64 keys. 8 warps, not FA2's 4: Triton keeps Q, S, P
        # and the fp32 accumulator in registers, and with 4 warps the AOT compile spills
        # (d64 sm80: 8 bytes; d128: 348 bytes); 8 warps need 187 (d64) and 222 (d128). sm90
        # (wgmma, two warpgroups of 64 rows) takes 128 keys at d64 (165 registers, 112 KB of
        # shared memory, half the loop trips) and a third stage (d128: 128 KB of 227 KB).
        if big:  # 4 warps spill (sm80); 64 keys need 255 registers at 8
            cfg = AttentionLaunch(64, 32, 8, 2)
        elif sm90:
            cfg = AttentionLaunch(128, 128, 8, 3) if d <= 64 else AttentionLaunch(128, 64, 8, 3)
        else:
            cfg = AttentionLaunch(128, 64, 8, 3) if d <= 64 else AttentionLaunch(128, 64, 8, 2)
    elif kernel == "decode":
        # M = the packed (query, group head) rows, at least 16 (the smallest mma tile); N = 64
        # keys a step (32 at d256). Memory-bound: stages keep several K/V tiles in flight.
        # A 64-row tile at d128 needs 255 registers with 4 warps, 159 with 8.
        block_m = min(64, max(16, triton.next_power_of_2(rows)))
        warps = 8 if block_m * d >= 64 * 128 else 4
        cfg = AttentionLaunch(block_m, 32 if big else 64, warps, 2 if big else 3)
    elif kernel == "combine":
        # one query row per program: a (SPLIT_CHUNK = 16, d) fp32 tile a step (the combine
        # kernel, attention_decode.py), 16 values a thread
        cfg = AttentionLaunch(1, 1, 4 if d >= 128 else 2, 1)
    elif kernel == "bwd_preprocess":
        cfg = AttentionLaunch(64, 1, 4, 1)
    elif kernel == "bwd_dkdv":
        # BLOCK_N keys held on chip (K, V and two fp32 accumulators) while BLOCK_M query rows
        # stream by (Triton's fused-attention tutorial: 128 keys x 32 queries at d64). 8 warps
        # throughout: 4 spill at d64 (sm90: 248 bytes) and d128. sm90 d128: 32 x 64 needs 254
        # registers (one Triton change from spilling), 16 x 128 needs 224 and reads Q, dO once
        # per 128 keys. sm80 needs smaller tiles under Triton 3.6 (the GPU image's) than under
        # 3.8: its AOT compile of 32 x 128 (d64) and 32 x 64 (d128) spills 44 and 12 bytes at
        # 255 registers. 16 x 128 (d64: 255 / 174 registers on 3.6 / 3.8) and 32 x 32 (d128:
        # 224 / 164) do not; their speed on an A100 is unmeasured.
        if big:  # 4 warps spill; 16 x 32 at 8 warps needs 216 registers
            cfg = AttentionLaunch(16, 32, 8, 2)
        elif d <= 64:
            cfg = AttentionLaunch(32, 128, 8, 3) if sm90 else AttentionLaunch(16, 128, 8, 2)
        else:
            cfg = AttentionLaunch(16, 128, 8, 2) if sm90 else AttentionLaunch(32, 32, 8, 2)
    elif kernel == "bwd_blocked":
        # block_m streams (BLOCK_M1 queries in the dK/dV role, BLOCK_N2 keys in the dQ role),
        # block_n stays on chip (BLOCK_N1 keys, BLOCK_M2 queries): the fused-attention
        # tutorial's 32 / 128, 4 warps, 5 stages on Hopper and 3 on Ampere.
        # The AOT compile moves off those where they spill (Triton 3.8): 4 warps at d64 sm_90
        # need 255 registers and spill 1192 bytes (32 x 64 x 4 warps: 252, none); sm_90 keeps
        # 32 x 128 on 8 warps at d64 (255 / 242 causal / not, 5 stages), and at d128 halves the
        # stream to 16 x 128 (32 x 128 spills 32 bytes non-causal, 3 stages; 5 spill 192).
        # sm_80: 32 x 64 on 8 warps (32 x 128 spills 300 bytes on 4 warps, 24 on 8).
        if big:
            cfg = AttentionLaunch(16, 32, 8, 2)
        elif sm90:
            cfg = AttentionLaunch(32, 128, 8, 5) if d <= 64 else AttentionLaunch(16, 128, 8, 3)
        else:
            cfg = AttentionLaunch(32, 64, 8, 3)
    else:  # bwd_dq
        # BLOCK_M queries held (Q, dO, fp32 dQ) while key blocks stream by (Triton's
        # fused-attention tutorial: 128 x 32 at d64). 8 warps: with 4, sm80 spills at d64
        # (24 bytes) and d128 (44).
        if big:
            cfg = AttentionLaunch(32, 32, 4, 2)
        elif d <= 64:
            cfg = AttentionLaunch(128, 64, 8, 3) if sm90 else AttentionLaunch(128, 32, 8, 3)
        else:
            cfg = AttentionLaunch(64, 64, 8, 3 if sm90 else 2)
    tuned = _tuned(kernel, d, arch) if elem_bytes == 2 else None
    if tuned is not None:
        return tuned._replace(block_m=cfg.block_m) if kernel == "decode" else tuned
    if elem_bytes > 2 and kernel in ("fwd", "decode", "bwd_dkdv", "bwd_dq", "bwd_blocked"):
        # fp32 tiles take twice the shared memory and registers (and run on FMA units with
        # input_precision="ieee"): halve both tile sides (at most 32) and keep two stages,
        # which stays in every shared-memory budget (d256 prefill 32 x 16: 66 KB). fp32 is
        # for correctness: Triton 3.8's ieee dot at d128 still spills on sm_90 (AOT: 600 bytes
        # fwd, 850 dq at 32 x 32; smaller tiles or 4 warps spill more).
        cfg = AttentionLaunch(min(32, max(16, cfg.block_m // 2)),
                              min(32, max(16, cfg.block_n // 2)),
                              cfg.num_warps, min(cfg.num_stages, 2))
    if small_smem and cfg.num_stages > 2:
        cfg = cfg._replace(num_stages=cfg.num_stages - 1)
    return cfg


def attention_bwd_structure(head_dim: int, arch: tuple[int, int] | None, *,
                            elem_bytes: int = 2) -> str:
    """The backward's structure (BWD_STRUCTURES) on ``arch``: "blocked" where the tuned table
    has a bwd_blocked winner for this capability and head_dim (benchmarks/tune.py writes one
    only when the blocked backward beat the split one there), else "split"."""
    if arch is None or elem_bytes != 2:
        return "split"
    d = max(16, triton.next_power_of_2(head_dim))
    return "blocked" if _tuned("bwd_blocked", d, arch) is not None else "split"


def _device_arch(device: torch.device) -> tuple[int, int] | None:
    """The ``arch`` argument of attention_launch_settings for tensors on ``device``."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def _num_sms(device: torch.device) -> int:
    """SMs on a GPU; under the interpreter a fixed 4 so that the split heuristic still splits
    test-sized decodes (programs run one at a time there, so the count is only a shape)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def num_splits_heuristic(n_programs: int, n_key_blocks: int, num_sms: int,
                         max_splits: int = MAX_SPLITS) -> int:
    """How many programs share one (row block, kv head)'s keys (FA2's num_splits_heuristic).

    No split when the unsplit grid already fills 80% of the slots (num_sms *
    DECODE_PROGRAMS_PER_SM programs resident at once): splitting would only add the partial
    writes and the combine. Otherwise the smallest split count whose wave efficiency (busy
    slots / launched slots over whole waves) is within 85% of the best, skipping counts that
    leave the longest split as long as one split fewer does (same per-program time, more
    partials).
    """
    slots = num_sms * DECODE_PROGRAMS_PER_SM
    if n_programs >= 0.8 * slots:
        return 1
    max_splits = max(1, min(max_splits, n_key_blocks, slots))

    def efficiency(s: int) -> float:
        waves = math.ceil(n_programs * s / slots)
        return n_programs * s / (waves * slots)

    def eligible(s: int) -> bool:
        return s == 1 or math.ceil(n_key_blocks / s) != math.ceil(n_key_blocks / (s - 1))

    best = max(efficiency(s) for s in range(1, max_splits + 1) if eligible(s))
    for s in range(1, max_splits + 1):
        if eligible(s) and efficiency(s) >= 0.85 * best:
            return s
    return 1


"""The CPU path of the ops: C kernels (cpu_lora.c, cpu_attention.c, cpu_ops.c) compiled once per machine, called with ctypes.

`lora_shrink` / `lora_expand` (kernels/lora.py), `paged_attention`
(kernels/attention.py) and the elementwise ops (kernels/ops.py) send CPU tensors here. Their torch references stay the spec:
the tests check this path against them. The library is built by `make install`
(`python -m lorafleet.kernels.cpu`) into a cache keyed by the sources, the flags and
the CPU, and again on first use if that key is missing. Without a C compiler the ops
fall back to the torch references (a warning says so once); nothing else changes.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name) for name in ("cpu_lora.c", "cpu_attention.c", "cpu_ops.c"))
HEADERS = (Path(__file__).with_name("cpu_types.h"),)
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
# The elementwise ops (cpu_ops.c) have no float16 kernels: gcc 12 does not vectorise float16 <->
# float32 conversions, and the scalar loops were 25x slower than torch. float16 stays on torch.
OPS_DTYPES = (torch.float32, torch.bfloat16)

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failed: str | None = None


def _cpu_key() -> str:
    """What -march=native depends on: the CPU's flags (a library built elsewhere may not run here)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def library_path(extra_flags: tuple[str, ...] = ()) -> Path:
    root = Path(os.environ.get("LORAFLEET_KERNEL_CACHE") or Path.home() / ".cache" / "lorafleet" / "kernels")
    code = b"".join(source.read_bytes() for source in SOURCES + HEADERS)
    key = hashlib.sha256(code + " ".join(CFLAGS + extra_flags).encode() + _cpu_key().encode()).hexdigest()[:16]
    return root / (f"lorafleet-cpu-{key}.so" if not extra_flags else f"lorafleet-cpu-variant-{key}.so")


# A variant without the native bfloat16 kernels (the float32-converting loops every CPU gets), for
# the tests and bench/kernels.py to hold both bfloat16 paths to the reference and to each other.
GENERIC_BF16 = ("-DLORAFLEET_NO_NATIVE_BF16",)
# The native bfloat16 kernels without AMX tiles (long segments on vdpbf16ps in registers), for the tests
# to hold that path to the reference on CPUs that have AMX too.
NO_AMX = ("-DLORAFLEET_NO_AMX",)


def build(extra_flags: tuple[str, ...] = ()) -> Path:
    """Compiles the C kernels unless this machine's library exists; returns its path. Raises on failure.

    extra_flags: a variant (e.g. GENERIC_BF16), cached beside the library under its own key.
    """
    target = library_path(extra_flags)
    if target.is_file():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH; set CC")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *CFLAGS, *extra_flags, "-o", tmp, *map(str, SOURCES), "-lm"],
                              capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise RuntimeError(f"{compiler} failed on the CPU kernels: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: another process building at once gets a whole file too
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if not extra_flags:
        for old in target.parent.glob("lorafleet-cpu-*.so"):  # older sources; a process using one keeps its mapping
            if old != target and not old.name.startswith("lorafleet-cpu-variant-"):
                old.unlink(missing_ok=True)
    return target


def load_variant(extra_flags: tuple[str, ...]) -> ctypes.CDLL:
    """A variant of the library, built if needed, for tests and benchmarks (the ops use library())."""
    return _declare(ctypes.CDLL(str(build(extra_flags))))


def amx_bf16(lib: ctypes.CDLL | None = None) -> bool:
    """Whether the library runs long bfloat16 segments on AMX tiles (built with them, and granted by Linux)."""
    lib = lib or library()
    return lib is not None and bool(lib.lorafleet_amx_init())


def native_bf16(lib: ctypes.CDLL | None = None) -> bool:
    """Whether the library's bfloat16 kernels use the CPU's bfloat16 dot products (AVX512-BF16)."""
    lib = lib or library()
    return lib is not None and bool(lib.lorafleet_native_bf16())


def library() -> ctypes.CDLL | None:
    """The loaded library, built if needed; None (after one warning) when it cannot be built."""
    global _library, _failed
    if _library is not None or _failed is not None:
        return _library
    with _lock:
        if _library is None and _failed is None:
            try:
                _library = _declare(ctypes.CDLL(str(build())))
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _failed = str(e)
                log.warning("CPU kernels unavailable, using the torch references (slower): %s", e)
    return _library


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i = ctypes.c_void_p, ctypes.c_int64
    for suffix in SUFFIX.values():
        getattr(lib, f"lora_shrink_{suffix}").argtypes = [p, i, i, p, i, p, i, p, p, p, i, p, p, i, p, i, i, i]
        getattr(lib, f"lora_expand_{suffix}").argtypes = [p, i, p, p, p, i, i, p, i, p, i, p, p, p, i, p, p, p, i, i, i]
        getattr(lib, f"lora_shrink_{suffix}").restype = None
        getattr(lib, f"lora_expand_{suffix}").restype = None
        getattr(lib, f"lora_apply_{suffix}").argtypes = [p, p, i, p, i, p, i]
        getattr(lib, f"lora_apply_{suffix}").restype = None
        getattr(lib, f"paged_attention_{suffix}").argtypes = [p, i, p, i, p, i, i, p, i, p, p, p, p, i, i, i, i, ctypes.c_float, i]
        getattr(lib, f"paged_attention_{suffix}").restype = i
    for suffix in ("f32", "bf16"):  # built with AVX-512 (bf16: and native bfloat16 dot products)
        if hasattr(lib, f"chunk_attention_{suffix}"):
            getattr(lib, f"chunk_attention_{suffix}").argtypes = lib.paged_attention_f32.argtypes
            getattr(lib, f"chunk_attention_{suffix}").restype = i
    f = ctypes.c_float
    for suffix in (SUFFIX[dtype] for dtype in OPS_DTYPES):
        getattr(lib, f"add_rms_norm_{suffix}").argtypes = [p, i, p, i, p, p, i, i, i, f, i]
        getattr(lib, f"rotary_{suffix}").argtypes = [p, i, i, i, p, i, i, i, p, p, i, i, i, i]
        getattr(lib, f"silu_mul_{suffix}").argtypes = [p, i, p, i, i, i, i]
        for op in ("add_rms_norm", "rotary", "silu_mul"):
            getattr(lib, f"{op}_{suffix}").restype = None
    lib.lorafleet_native_bf16.argtypes = []
    lib.lorafleet_native_bf16.restype = ctypes.c_int
    lib.lorafleet_amx_init.argtypes = []
    lib.lorafleet_amx_init.restype = ctypes.c_int
    lib.lorafleet_amx_init()  # asks Linux for the tile registers once per process; 0 where there are none
    return lib


def usable(t: torch.Tensor) -> bool:
    return t.is_cpu and t.dtype in SUFFIX and library() is not None


# ---------------------------------------------------------------- LoRA: per-step metadata

# Segments of at least this many tokens run as matrix products on gathered weights (AMX tiles in
# bfloat16), shorter ones as dot products on the pages (cpu_lora.c). Where the products start to win,
# measured with bench/kernels.py --segments (kernels/README.md).
TILE_TOKENS = 8


@dataclass
class Segments:
    """The step's tokens with an adapter, grouped by adapter: segment k is rows order[start[k]:start[k+1]]."""

    order: torch.Tensor
    start: torch.Tensor
    adapter: torch.Tensor

    @staticmethod
    def of(token_adapter: torch.Tensor, num_adapters: int) -> "Segments":
        """Tokens in step order within each segment, segments by adapter index; no Python loop over tokens."""
        token_adapter = token_adapter.to(torch.int64)
        rows = (token_adapter >= 0).nonzero().squeeze(1)
        adapters = token_adapter[rows]
        beyond = (adapters >= num_adapters).nonzero()
        if beyond.numel():
            t = int(rows[beyond[0, 0]])
            raise ValueError(f"LoRA op: token {t} names adapter {int(token_adapter[t])}, the page table has {num_adapters}")
        adapters, by_adapter = adapters.sort(stable=True)
        adapter, counts = torch.unique_consecutive(adapters, return_counts=True)
        start = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return Segments(rows[by_adapter].contiguous(), start, adapter.contiguous())


@dataclass
class GroupArgs:
    """A group's metadata for the C kernels, and the arguments they take from it, the step's page table
    and its segments: pointers taken once per step, valid while `table` and `segments` hold the tensors."""

    a_offset: torch.Tensor
    b_offset: torch.Tensor
    rank: torch.Tensor
    scale: torch.Tensor
    out_offset: torch.Tensor
    out_dim: torch.Tensor
    table: torch.Tensor | None = None
    segments: Segments | None = None
    shrink_args: tuple = ()  # page_table .. num_targets of lora_shrink_*
    expand_args: tuple = ()  # page_table .. num_targets of lora_expand_*
    apply_meta: torch.Tensor | None = None  # lora_apply_*'s packed arguments, for pools of rows apply_page_dim
    apply_page_dim: int = 0

    def bind(self, table: torch.Tensor, seg: Segments) -> "GroupArgs":
        self.table, self.segments = table, seg
        walk = (table.data_ptr(), table.shape[1], seg.order.data_ptr(), seg.start.data_ptr(), seg.adapter.data_ptr(),
                seg.adapter.numel())
        num_targets = self.rank.shape[1]
        self.shrink_args = (*walk, self.a_offset.data_ptr(), self.rank.data_ptr(), num_targets)
        self.expand_args = (*walk, self.b_offset.data_ptr(), self.rank.data_ptr(), self.scale.data_ptr(), num_targets)
        return self

    def pack(self, tokens: int, group, page_dim: int) -> None:
        """lora_apply_*'s m (cpu_lora.c): the step's arguments of shrink and expand in one int64 array."""
        table, seg = self.table, self.segments
        self.apply_meta = torch.tensor([
            tokens, group.in_dim, page_dim, table.data_ptr(), table.shape[1], seg.order.data_ptr(),
            seg.start.data_ptr(), seg.adapter.data_ptr(), seg.adapter.numel(), self.a_offset.data_ptr(),
            self.b_offset.data_ptr(), self.rank.data_ptr(), self.scale.data_ptr(), self.rank.shape[1],
            group.max_rank, self.out_offset.data_ptr(), self.out_dim.data_ptr(), TILE_TOKENS,
        ], dtype=torch.int64)
        self.apply_page_dim = page_dim


def _prepare(pool: torch.Tensor, batch, group) -> tuple[Segments, GroupArgs]:
    """Built once per step (cached on the batch and group) and checked, so the C code never reads outside the pool."""
    if batch._cpu_segments is None:
        if not batch.page_table.is_contiguous() or batch.page_table.dtype != torch.int64:
            batch.page_table = batch.page_table.to(torch.int64).contiguous()
        table = batch.page_table
        if table.numel() and (int(table.min()) < 0 or int(table.max()) >= pool.shape[0]):
            raise ValueError(f"LoRA op: the adapter page table points outside the pool's {pool.shape[0]} pages")
        batch._cpu_segments = Segments.of(batch.token_adapter, table.shape[0])
    if group._cpu_args is None:
        rank = group.rank.contiguous()
        out_dims = torch.tensor(group.out_dims, dtype=torch.int64)
        a_end = group.a_offset + rank * group.in_dim
        b_end = group.b_offset + rank * group.shards * out_dims
        room = batch.page_table.shape[1] * pool.shape[1]
        if bool(((rank > 0) & ((a_end > room) | (b_end > room) | (group.a_offset < 0) | (group.b_offset < 0))).any()):
            raise ValueError("LoRA op: a target's A or B reaches past its adapter's pages")
        group._cpu_args = GroupArgs(
            group.a_offset.contiguous(), group.b_offset.contiguous(), rank, group.scale.float().contiguous(),
            torch.tensor(group.out_offsets, dtype=torch.int64), out_dims,
        ).bind(batch.page_table, batch._cpu_segments)
    return batch._cpu_segments, group._cpu_args


# ---------------------------------------------------------------- LoRA: the ops


def shrink(x: torch.Tensor, pool: torch.Tensor, batch, group) -> torch.Tensor:
    """As kernels.lora.lora_shrink, for CPU tensors (checked there)."""
    _, args = _prepare(pool, batch, group)
    if x.stride(1) != 1:
        x = x.contiguous()
    s = x.new_zeros(x.shape[0], len(group.out_dims), group.max_rank)
    fn = getattr(library(), f"lora_shrink_{SUFFIX[x.dtype]}")
    fn(x.data_ptr(), x.stride(0), group.in_dim, pool.data_ptr(), pool.shape[1], *args.shrink_args,
       s.data_ptr(), group.max_rank, TILE_TOKENS, torch.get_num_threads())
    return s


def apply(y: torch.Tensor, x: torch.Tensor, pool: torch.Tensor, batch, group) -> torch.Tensor:
    """As kernels.lora.lora_apply, for CPU tensors (checked there): shrink and expand in one C call."""
    _, args = _prepare(pool, batch, group)
    if x.stride(1) != 1:
        x = x.contiguous()
    if y.stride(1) != 1:
        raise ValueError(f"lora_apply: y's columns must be adjacent (stride {y.stride(1)})")
    if args.apply_meta is None:
        args.pack(x.shape[0], group, pool.shape[1])
    elif pool.shape[1] != args.apply_page_dim:
        raise ValueError(f"lora_apply: a pool of {pool.shape[1]}-element pages, this step's earlier calls had "
                         f"{args.apply_page_dim}")
    fn = getattr(library(), f"lora_apply_{SUFFIX[y.dtype]}")
    fn(args.apply_meta.data_ptr(), y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0), pool.data_ptr(),
       torch.get_num_threads())
    return y


def expand(y: torch.Tensor, s: torch.Tensor, pool: torch.Tensor, batch, group) -> torch.Tensor:
    """As kernels.lora.lora_expand, for CPU tensors (checked there); y may be a column slice."""
    _, args = _prepare(pool, batch, group)
    if y.stride(1) != 1:
        raise ValueError(f"lora_expand: y's columns must be adjacent (stride {y.stride(1)})")
    s = s.contiguous()
    fn = getattr(library(), f"lora_expand_{SUFFIX[y.dtype]}")
    fn(y.data_ptr(), y.stride(0), args.out_offset.data_ptr(), args.out_dim.data_ptr(), s.data_ptr(), group.max_rank,
       group.shards, pool.data_ptr(), pool.shape[1], *args.expand_args, TILE_TOKENS, torch.get_num_threads())
    return y


# ---------------------------------------------------------------- attention

# Sequences with at least this many new tokens (prefill chunks) are computed as matrix products: by
# the C chunk kernel (cpu_attention.c chunk_attention_*: keys packed once per block of 32 new tokens,
# scores and P.V blocked in registers, K and V read from the pages) where chunk_kernel() finds one,
# else by torch's fused CPU attention on K and V gathered from the pages. The others (decode rows,
# the shortest chunks) go to the C decode kernel, which reads K and V in place one token at a time.
# The crossover was measured with SmolLM2-135M's heads (kernels/README.md).
MATMUL_MIN_TOKENS = 8


@dataclass
class Chunk:
    """A sequence whose new tokens q[first:first + n] attend through matmuls; pages: (c,) int64, its
    table row up to its context (a view: nothing of the table is copied), checked against the pool."""

    first: int
    n: int
    pages: torch.Tensor


@dataclass
class AttentionPlan:
    """What paged_attention derives from a step's metadata once, for every layer of the step.

    kernel_seqs: (S_k,) int64, the sequences the C kernel computes, in step order.
    chunks: the other sequences (MATMUL_MIN_TOKENS new tokens or more).
    chunk_seqs: (S_c,) int64, the chunks' sequence indices, for the C chunk kernel (chunk_attention_*).
    num_pages: the pool size the chunks' pages were checked against.
    masks: (n, c, dtype) -> the additive causal mask of a chunk after c - n cached keys, built on first use.
    """

    kernel_seqs: torch.Tensor
    chunks: list[Chunk]
    chunk_seqs: torch.Tensor
    num_pages: int
    masks: dict = field(default_factory=dict)

    def mask(self, n: int, c: int, dtype: torch.dtype) -> torch.Tensor:
        """(n, c): 0 where new token j may see key p (p <= c - n + j), -inf where it may not."""
        key = (n, c, dtype)
        if key not in self.masks:
            self.masks[key] = torch.full((n, c), float("-inf"), dtype=dtype).triu_(c - n + 1)
        return self.masks[key]


def _attention_plan(num_tokens: int, pool: torch.Tensor, batch) -> AttentionPlan:
    """Checks the metadata the C code trusts (rows, lengths, token ranges: O(sequences), nothing of the
    table is scanned) and the chunks' pages, and splits the sequences between the two paths."""
    table, rows, starts, lens = batch.page_table, batch.table_rows, batch.query_start, batch.context_lens
    if not all(t.dtype == torch.int64 and t.is_contiguous() for t in (table, rows, starts, lens)):
        raise ValueError("paged_attention: page_table, table_rows, query_start and context_lens must be contiguous int64")
    news = starts[1:] - starts[:-1]
    if (table.dim() != 2 or rows.shape != lens.shape or starts.shape[0] != lens.shape[0] + 1
            or int(starts[-1]) != num_tokens
            or bool((news < 1).any() | (lens < news).any() | (lens > table.shape[1]).any()
                    | (rows < 0).any() | (rows >= table.shape[0]).any())):
        raise ValueError("paged_attention: query_start, context_lens, table_rows and the page table disagree")
    kernel_seqs, chunks, chunk_seqs = [], [], []
    for i, (first, n, c, row) in enumerate(zip(starts.tolist(), news.tolist(), lens.tolist(), rows.tolist())):
        if n < MATMUL_MIN_TOKENS:
            kernel_seqs.append(i)
            continue
        pages = table[row, :c]
        if int(pages.min()) < 0 or int(pages.max()) >= pool.shape[0]:
            raise ValueError(f"paged_attention: the page table row of sequence {i} points outside the pool's {pool.shape[0]} pages")
        chunks.append(Chunk(first, n, pages))
        chunk_seqs.append(i)
    return AttentionPlan(torch.tensor(kernel_seqs, dtype=torch.int64), chunks,
                         torch.tensor(chunk_seqs, dtype=torch.int64), pool.shape[0])


def chunk_kernel(lib: ctypes.CDLL | None, q: torch.Tensor):
    """The C function for chunks of q's dtype, or None where chunks go to torch's fused attention.

    float32 on a CPU with AVX-512; bfloat16 on one with native bfloat16 dot products (AVX512-BF16) and
    no AMX, for heads of an even size. With AMX, torch's flash kernel multiplies on the tiles (about 190
    GFLOP/s on 128-token prompts on the Xeon of kernels/README.md), while the C kernel's dot products
    were measured only on an AMD EPYC without AMX: bfloat16 chunks stay with torch there until measured."""
    if lib is None or q.dtype not in (torch.float32, torch.bfloat16):
        return None
    if q.dtype == torch.bfloat16 and (q.shape[2] % 2 or amx_bf16(lib)):
        return None
    return getattr(lib, f"chunk_attention_{SUFFIX[q.dtype]}", None)


def paged_attention(q: torch.Tensor, pool: torch.Tensor, batch, num_kv_heads: int) -> torch.Tensor:
    """As kernels.attention.paged_attention, for CPU tensors (head counts checked there).

    Decode rows and the shortest chunks go to the C decode kernel, longer chunks to the C chunk kernel
    (chunk_kernel) or, where there is none, to _chunk_attention; both C kernels check each sequence's
    pages against the pool before they read K or V. The plan that splits them is built and checked
    once per step (kept on the batch) and shared by every layer."""
    num_tokens, num_heads, head_dim = q.shape
    if 2 * num_kv_heads * head_dim > pool.shape[1] or not pool.is_contiguous():
        raise ValueError(f"paged_attention: pool {tuple(pool.shape)} must be contiguous with rows of >= {2 * num_kv_heads * head_dim}")
    if batch._cpu_plan is None or batch._cpu_plan.num_pages != pool.shape[0]:
        batch._cpu_plan = _attention_plan(num_tokens, pool, batch)
    plan = batch._cpu_plan
    q = q if q.stride(2) == 1 and q.stride(1) == head_dim else q.contiguous()
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype)
    lib = library()
    chunk_fn = chunk_kernel(lib, q) if plan.chunks else None
    for fn, seqs in ((getattr(lib, f"paged_attention_{SUFFIX[q.dtype]}"), plan.kernel_seqs), (chunk_fn, plan.chunk_seqs)):
        if fn is None or not seqs.numel():
            continue
        bad = fn(q.data_ptr(), q.stride(0), out.data_ptr(), out.stride(0),
                 pool.data_ptr(), pool.shape[1], pool.shape[0], batch.page_table.data_ptr(), batch.page_table.shape[1],
                 batch.table_rows.data_ptr(), batch.query_start.data_ptr(), batch.context_lens.data_ptr(),
                 seqs.data_ptr(), seqs.numel(), num_heads, num_kv_heads, head_dim, head_dim ** -0.5,
                 torch.get_num_threads())
        if bad:
            raise ValueError(f"paged_attention: the page table row of sequence {bad - 1} points outside the pool's {pool.shape[0]} pages")
    if chunk_fn is None:
        for chunk in plan.chunks:
            out[chunk.first:chunk.first + chunk.n] = _chunk_attention(q[chunk.first:chunk.first + chunk.n], pool, chunk,
                                                                      plan, num_kv_heads)
    return out


def _chunk_attention(q: torch.Tensor, pool: torch.Tensor, chunk: Chunk, plan: AttentionPlan, num_kv_heads: int) -> torch.Tensor:
    """q: (n, H, d), the chunk's new tokens -> (n, H, d): the reference's formula for one sequence.

    K and V of the chunk's c positions are gathered into one (c, D) copy of their pages; torch's
    fused attention (scores and P.V as matmuls in q.dtype with float32 accumulation, softmax in
    float32) runs on the 4-d views (1, heads, tokens, d) it is fast on (3-d inputs take a slower
    path), with grouped-query heads read in place. A whole prompt (n == c) is causal; a chunk after
    cached keys takes the plan's mask, which lets token j see keys 0 .. c - n + j."""
    n, c, head_dim = q.shape[0], chunk.pages.numel(), q.shape[2]
    kv_size = num_kv_heads * head_dim
    rows = pool.index_select(0, chunk.pages)
    k = rows[:, :kv_size].unflatten(1, (num_kv_heads, head_dim)).transpose(0, 1)
    v = rows[:, kv_size:2 * kv_size].unflatten(1, (num_kv_heads, head_dim)).transpose(0, 1)
    mask = None if n == c else plan.mask(n, c, q.dtype)
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask,
                                       is_causal=n == c, scale=head_dim ** -0.5, enable_gqa=True)
    return o[0].transpose(0, 1)


# ---------------------------------------------------------------- the elementwise ops


def ops_usable(t: torch.Tensor) -> bool:
    return t.dtype in OPS_DTYPES and usable(t)


def add_rms_norm_(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As kernels.ops.add_rms_norm_, for CPU tensors (checked there) whose h has adjacent columns."""
    if delta is not None and delta.stride(1) != 1:
        delta = delta.contiguous()
    weight = weight.contiguous()
    out = torch.empty(h.shape, dtype=h.dtype)
    fn = getattr(library(), f"add_rms_norm_{SUFFIX[h.dtype]}")
    fn(h.data_ptr(), h.stride(0), None if delta is None else delta.data_ptr(), 0 if delta is None else delta.stride(0),
       weight.data_ptr(), out.data_ptr(), out.stride(0), h.shape[0], h.shape[1], eps, torch.get_num_threads())
    return out


def rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """As kernels.ops.rotary, in place, for CPU tensors (checked there) whose heads are contiguous rows."""
    if cos.stride(-1) != 1 or sin.stride(-1) != 1 or cos.stride(0) != sin.stride(0):
        cos, sin = cos.contiguous(), sin.contiguous()
    fn = getattr(library(), f"rotary_{SUFFIX[q.dtype]}")
    fn(q.data_ptr(), q.stride(0), q.stride(1), q.shape[1], k.data_ptr(), k.stride(0), k.stride(1), k.shape[1],
       cos.data_ptr(), sin.data_ptr(), cos.stride(0), q.shape[0], q.shape[2], torch.get_num_threads())


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """As kernels.ops.silu_mul, for CPU tensors (checked there)."""
    if gate_up.stride(1) != 1:
        gate_up = gate_up.contiguous()
    inter = gate_up.shape[1] // 2
    out = torch.empty(gate_up.shape[0], inter, dtype=gate_up.dtype)
    fn = getattr(library(), f"silu_mul_{SUFFIX[gate_up.dtype]}")
    fn(gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), out.stride(0), gate_up.shape[0], inter,
       torch.get_num_threads())
    return out


if __name__ == "__main__":  # make install: build now rather than on the first request
    print(build())

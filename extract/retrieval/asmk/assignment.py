"""Exact nearest-centroid search (L2) at the speed of the hardware's fastest matrix product.

:class:`NearestWords` gives each descriptor its ``m`` nearest centroids (visual words), nearest
first, exactly: by their squared distances computed in float64 and rounded to float32, equal
float32 distances to the lower index, as faiss ``IndexFlatL2`` orders them (faiss's own float32
distances are a few units in the last place off, so words closer than that can come in either
order there). The work is a matrix product, done in a low precision where the hardware
multiplies fast (bfloat16 on a CPU with avx512_bf16 or AMX through torch's oneDNN, and on CUDA),
then certified:

1. **Blocked product.** Descriptors and centroids are augmented so that one product gives each
   (descriptor, word) pair's key ``k = x.c - |x|^2/2 - |c|^2/2 = -|x - c|^2/2`` (higher is
   nearer): ``X = [x^, -a_hi, -a_lo, 1, 1]``, ``C = [c^, 1, 1, -b_hi, -b_lo]``, ``x^``, ``c^`` the
   inputs rounded to the product's precision, ``a = |x|^2/2`` and ``b = |c|^2/2`` (float64) each
   split into two numbers of that precision. The centroids are taken in blocks of TILE words;
   each block's keys are reduced at once to the best of each group of GROUP words (words ``j +
   i TILE/GROUP`` of the block), so the full (n, K) product is never kept; groups ``j`` of all
   blocks make a super-group.
2. **Short list.** The ``keep`` best super-groups, then the ``keep`` best of their groups, give
   each descriptor ``keep * GROUP`` candidates; ``tau``, the larger of the first super-group and
   group left out, bounds the computed key of every word outside the list.
3. **Exact re-ranking.** The candidates' distances are computed in float64, rounded to float32
   and sorted (ties to the lower index). The list is certified when every word outside it is
   provably farther than the m-th, ``d_m``: ``-2 (tau + u_out |tau| + E) - e64 > next(d_m)``
   (below; next: the float32 after). A descriptor whose list is not certified gets a longer one
   (:func:`kept_groups`), then, if that is not certified either, its words from the same float64
   distances to all centroids.

**The bound E.** For a word ``c`` outside the list (computed key ``<= tau``), with ``u`` the unit
roundoff of the product's inputs (bfloat16: 2^-8, float32: 2^-24), ``u_acc`` that of its float32
accumulation and ``n = D + 4``:

- inputs: ``x^.c^ - x.c = x^.(c^ - c) + (x^ - x).c``, so ``|x^.c^ - x.c| <= |x^| |c^ - c| + |x^ -
  x| |c|`` (Cauchy-Schwarz; the rounding residuals' norms are measured, ~u/2 of the norms); the
  split norms: ``|a - a_hi - a_lo| <= u^2 a``, likewise b;
- accumulation: the products are exact in float32 (8-bit significands), their sum in any order
  errs by at most ``gamma_n sum_i |X_i C_i| <= gamma_n |X| |C|``, ``gamma_n = n u_acc / (1 - n
  u_acc)``; u_acc = 2^-22 (four times round-to-nearest's: covers truncating multi-operand adders of
  tensor cores); subnormals flushed to zero (avx512_bf16, AMX) add ``<= n 2^-125 (1 + |X|_inf)(1 +
  |C|_inf)``;
- output: a bfloat16 product rounds each key: ``|fl(v) - v| <= u |fl(v)|``, so the exact key of a
  word outside is ``<= tau + u_out |tau| + E`` (u_out = 0 for a float32 product).

E sums these terms with each centroid's norms replaced by their maximum; ``e64 = 2 (D + 4) 2^-53 (2a
+ |c|^2_max + 2 |x| |c|_max)`` bounds the float64 distances' own error and that of the float64 norms
the split starts from. The m nearest are then in the list, and an outside word with the m-th's
float32 distance (which the index order would decide) never certifies. With bfloat16 the margin
``2 (u_out |tau| + E) + e64`` is about 0.01 in squared distance between unit vectors (at most 4
apart): the measured residuals are ~2^-8.5 of the norms.

Without native bfloat16 (CPUs without avx512_bf16/AMX) the product is float32: the same
certificate, margin ~1e-4 (the accumulation's); on the CPU from FAISS_MIN_DIM dimensions, faiss's
flat search, faster there (:func:`default_method`). Descriptors given as torch tensors are assigned on their device and
their words returned there (CUDA: bfloat16).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, TypeVar

import faiss
import numpy as np
import torch

from train.runtime import native_bf16

# words per group, words per block of the product, descriptors per batch (its memory, bfloat16:
# 2 bytes per descriptor and word of a block, and per descriptor and group)
GROUP = 8
TILE = 4096
ROWS = 2048
# centroid values gathered at once for the re-ranking
RERANK_VALUES = 1 << 18

# the exact methods: a certified product in bfloat16 or float32, or faiss's flat search
METHODS = ("bf16", "fp32", "faiss")
# without native bfloat16, faiss's flat search from this dimension on the CPU (faster there than
# the float32 product on the bench's CPU; docs/benchmarks.md)
FAISS_MIN_DIM = 128
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# unit roundoff of the product's inputs (round to nearest: 2^-p for p significand bits)
UNIT_ROUNDOFF = {"bf16": 2.0 ** -8, "fp32": 2.0 ** -24}
ACCUMULATION_ROUNDOFF = 2.0 ** -22
FLOAT64_ROUNDOFF = 2.0 ** -53


def kept_groups(m: int) -> tuple[int, ...]:
    """Groups kept per descriptor for its m words, in turn: the first short list certifies for
    nearly all descriptors of the bench's codebook (tests/bench/bench_retrieval.py --part assign),
    the longer one for those it does not."""
    return m + 3, 4 * (m + 3)


Words = TypeVar("Words", np.ndarray, torch.Tensor)


def multiplies_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 natively: CUDA with bfloat16 support, or a CPU with
    avx512_bf16 or AMX (:func:`train.runtime.native_bf16`), which torch's oneDNN uses."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and native_bf16()


def default_method(device: torch.device, dim: int) -> str:
    """The exact method :class:`NearestWords` uses on ``device`` for ``dim``-D descriptors: bf16
    where it is native, else fp32 (faiss on the CPU from FAISS_MIN_DIM)."""
    if multiplies_bf16(device):
        return "bf16"
    return "faiss" if device.type == "cpu" and dim >= FAISS_MIN_DIM else "fp32"


def split(v: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``v`` as hi + lo in ``dtype``, ``|v - hi - lo| <= u^2 |v|``."""
    hi = v.to(dtype)
    return hi, (v - hi.double()).to(dtype)


@contextmanager
def full_precision_reductions(device: torch.device) -> Iterator[None]:
    """CUDA bfloat16 products accumulate in float32 inside the block (torch lets cuBLAS reduce
    split products in bfloat16 by default)."""
    if device.type != "cuda":
        yield
        return
    flags = torch.backends.cuda.matmul
    before = flags.allow_bf16_reduced_precision_reduction
    flags.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        flags.allow_bf16_reduced_precision_reduction = before


@dataclass(frozen=True)
class Prepared:
    """One codebook on one device, ready for one product (the module's doc)."""

    product: str
    tile: int                  # words per block (a multiple of GROUP)
    augmented: torch.Tensor    # C (blocks * tile, D + 4) in the product's dtype; padding keys -inf
    centroids: torch.Tensor    # (K, D) float64
    half_norms: torch.Tensor   # b = |c|^2 / 2 (K,) float64
    grouped: torch.Tensor      # (groups, GROUP, D) float32: the centroids of each group, padding 0
    grouped_half_norms: torch.Tensor  # (groups, GROUP) float64, padding inf
    residual_max: float        # max |c^ - c|
    norm_max: float            # max |c|
    augmented_max: float       # max |C|
    augmented_inf: float       # max |C_i|
    half_norm_max: float       # max b


def prepare(centroids: torch.Tensor, product: str) -> Prepared:
    """:class:`Prepared` of (K, D) float32 ``centroids`` (on their device) for ``product``."""
    dtype = DTYPES[product]
    c64 = centroids.double()
    b = (c64 * c64).sum(1) / 2
    chat = centroids.to(dtype)
    b_hi, b_lo = split(b, dtype)
    ones = torch.ones_like(b_hi)[:, None]
    aug = torch.cat([chat, ones, ones, -b_hi[:, None], -b_lo[:, None]], 1)
    real = aug.double()
    tile = min(TILE, -(-len(aug) // GROUP) * GROUP)
    pad = -len(aug) % tile
    fill = torch.zeros((pad, aug.shape[1]), dtype=dtype, device=aug.device)
    fill[:, -2] = -torch.inf
    aug = torch.cat([aug, fill])
    # group j of block t: words t tile + j + i tile / GROUP (i < GROUP), its centroids side by side
    shape, dim = (-1, GROUP, tile // GROUP), centroids.shape[1]
    grouped = torch.cat([centroids, centroids.new_zeros((pad, dim))]).view(*shape, dim).transpose(1, 2)
    grouped_b = torch.cat([b, b.new_full((pad,), torch.inf)]).view(shape).transpose(1, 2)
    return Prepared(product, tile, aug.contiguous(), c64, b,
                    grouped.reshape(-1, GROUP, dim).contiguous(), grouped_b.reshape(-1, GROUP).contiguous(),
                    residual_max=float((chat.double() - c64).norm(dim=1).max()),
                    norm_max=float(c64.norm(dim=1).max()),
                    augmented_max=float(real.norm(dim=1).max()),
                    augmented_inf=float(real.abs().max()),
                    half_norm_max=float(b.max()))


def ranked(dist: torch.Tensor, words: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The m nearest of each row's distinct ``words`` (n, L) by float64 ``dist`` (n, L) rounded to
    float32 (negative ones, float64's rounding of 0, to 0), equal ones to the lower index: (words
    (n, m), their float32 distances (n, m)), nearest first."""
    d32 = dist.float().clamp(min=0) + 0.0    # + 0.0: no -0.0
    # float32 >= 0 order as their bits do: one int64 key (distance bits, word) orders both
    key = (d32.view(torch.int32).long() << 32) | words
    top = torch.topk(key, m, dim=1, largest=False).values
    return top & 0xFFFFFFFF, (top >> 32).int().view(torch.float32)


def search_all(x64: torch.Tensor, prep: Prepared, m: int) -> torch.Tensor:
    """The m nearest words (n, m) of each row of ``x64`` (n, D) float64 among all centroids."""
    a2 = (x64 * x64).sum(1, keepdim=True)
    out = [torch.empty((0, m), dtype=torch.int64, device=x64.device)]
    for s in range(0, len(x64), 256):
        dist = a2[s:s + 256] + 2 * prep.half_norms - 2 * (x64[s:s + 256] @ prep.centroids.T)
        words = torch.arange(dist.shape[1], device=dist.device).expand_as(dist)
        out.append(ranked(dist, words, m)[0])
    return torch.cat(out)


def margin(tau: torch.Tensor, x: torch.Tensor, x64: torch.Tensor, a: torch.Tensor, xaug: torch.Tensor,
           prep: Prepared) -> torch.Tensor:
    """How much nearer than ``-2 tau`` (n,) float64 a word outside the list can be, in float64
    squared distance: ``2 (u_out |tau| + E) + e64`` (the module's doc)."""
    u = UNIT_ROUNDOFF[prep.product]
    u_out = u if prep.product != "fp32" else 0.0
    n, dim = xaug.shape[1], x.shape[1]
    gamma = n * ACCUMULATION_ROUNDOFF / (1 - n * ACCUMULATION_ROUNDOFF)
    xhat = xaug[:, :dim].double()
    aug = xaug.double()
    inputs = (xhat.norm(dim=1) * prep.residual_max + (xhat - x64).norm(dim=1) * prep.norm_max
              + u * u * (a + prep.half_norm_max))
    accumulation = (gamma * aug.norm(dim=1) * prep.augmented_max
                    + n * 2.0 ** -125 * (1 + aug.abs().amax(dim=1)) * (1 + prep.augmented_inf))
    e64 = 2 * (dim + 4) * FLOAT64_ROUNDOFF * (2 * a + 2 * prep.half_norm_max + 2 * x64.norm(dim=1) * prep.norm_max)
    return 2 * (u_out * tau.abs() + inputs + accumulation) + e64


def group_distances(x64: torch.Tensor, prep: Prepared, groups: torch.Tensor) -> torch.Tensor:
    """float64 squared distances (n, keep * GROUP) of the rows of ``x64`` (n, D) to the words of
    their (n, keep) ``groups``, group by group (the products of float32 values are exact in float64);
    in batches of rows (the gathered centroids stay small)."""
    n, keep = groups.shape
    dim = x64.shape[1]
    dots = torch.empty((n, keep * GROUP), dtype=torch.float64, device=x64.device)
    rows = max(1, RERANK_VALUES // (keep * GROUP * dim))
    for s in range(0, n, rows):
        c = torch.index_select(prep.grouped, 0, groups[s:s + rows].reshape(-1)).view(-1, keep * GROUP, dim)
        torch.sum(c.double() * x64[s:s + rows, None], dim=2, out=dots[s:s + rows])
    a2 = (x64 * x64).sum(1, keepdim=True)
    return a2 + 2 * prep.grouped_half_norms[groups].reshape(n, -1) - 2 * dots


def shortlist(x: torch.Tensor, prep: Prepared, m: int, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(words (n, m), certified (n,) bool) of the rows of float32 ``x`` (n, D): steps 1-3 of the
    module's doc; words of rows not certified are to be discarded."""
    dtype = DTYPES[prep.product]
    n = len(x)
    dev = x.device
    x64 = x.double()
    a = (x64 * x64).sum(1) / 2
    a_hi, a_lo = split(a, dtype)
    ones = torch.ones_like(a_hi)[:, None]
    xaug = torch.cat([x.to(dtype), -a_hi[:, None], -a_lo[:, None], ones, ones], 1)
    tile, blocks = prep.tile, len(prep.augmented) // prep.tile
    width = tile // GROUP
    # step 1: keys (words, descriptors) of a block, then each group's best (the groups' rows are
    # contiguous slabs: an elementwise maximum)
    best = torch.empty((blocks, width, n), dtype=dtype, device=dev)
    keys = torch.empty((tile, n), dtype=dtype, device=dev)
    with full_precision_reductions(dev):
        for t in range(blocks):
            torch.mm(prep.augmented[t * tile:(t + 1) * tile], xaug.T, out=keys)
            torch.amax(keys.view(GROUP, width, n), dim=0, out=best[t])
    # step 2: super-groups (the j-th group of every block), then their groups
    sv, si = torch.topk(best.amax(0).T.contiguous(), keep + 1, dim=1)
    tau = sv[:, keep]
    if blocks > 1:
        inner = best.permute(2, 1, 0).gather(1, si[:, :keep, None].expand(n, keep, blocks)).reshape(n, -1)
        gv, gi = torch.topk(inner, keep + 1, dim=1)
        tau = torch.maximum(tau, gv[:, keep])
        block, j = gi[:, :keep] % blocks, si.gather(1, gi[:, :keep] // blocks)
    else:
        block, j = torch.zeros_like(si[:, :keep]), si[:, :keep]
    # step 3: float64 distances of the candidates (padding words: infinitely far)
    cand = (block * tile + j)[:, :, None] + torch.arange(0, tile, width, device=dev)
    dist = group_distances(x64, prep, block * width + j)
    words, d32 = ranked(dist, cand.reshape(n, -1), m)
    # every word outside the list is farther than `outside` (padding only: infinitely far)
    tau = tau.double()
    outside = torch.where(torch.isneginf(tau), torch.inf, -2 * tau - margin(tau, x, x64, a, xaug, prep))
    return words, outside > torch.nextafter(d32[:, -1], torch.tensor(torch.inf, device=dev)).double()


class NearestWords:
    """Exact m nearest centroids of (n, D) descriptors (module doc). A numpy array is assigned on
    ``device`` (default: CUDA where torch sees it, else the CPU) and gives numpy words; a torch
    tensor is assigned on its own device and gives words there. ``method`` (default:
    :func:`default_method` of the device): bf16 or fp32, the certified products, or faiss."""

    def __init__(self, centroids: np.ndarray, method: str | None = None,
                 device: torch.device | str | None = None) -> None:
        if method is not None and method not in METHODS:
            raise ValueError(f"exact assignment {method!r}: expected one of {', '.join(METHODS)}")
        self.array = np.ascontiguousarray(centroids, dtype=np.float32)
        self.size, self.dim = self.array.shape
        self.chosen = method
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._prepared: dict[torch.device, Prepared] = {}

    def method(self, device: torch.device) -> str:
        """The method used on ``device``."""
        return self.chosen or default_method(device, self.dim)

    def prepared(self, device: torch.device) -> Prepared:
        """The codebook prepared on ``device`` for its method's product (once)."""
        if device not in self._prepared:
            self._prepared[device] = prepare(torch.from_numpy(self.array).to(device), self.method(device))
        return self._prepared[device]

    def __call__(self, x: Words, m: int) -> Words:
        """The ``min(m, K)`` nearest words (n, min(m, K)) int64 of each row of ``x`` (n, D), nearest first."""
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
            return self(x, m).cpu().numpy()
        m = min(m, self.size)
        if not len(x):
            return torch.empty((0, m), dtype=torch.int64, device=x.device)
        if self.method(x.device) == "faiss":
            words = faiss.knn(np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32), self.array, m)[1]
            return torch.from_numpy(words).to(x.device)
        x = x.float()
        prep = self.prepared(x.device)
        keeps = [keep for keep in kept_groups(m) if keep < prep.tile // GROUP]
        out = []
        for s in range(0, len(x), ROWS):
            rows = x[s:s + ROWS]
            words = torch.empty((len(rows), m), dtype=torch.int64, device=x.device)
            todo = torch.arange(len(rows), device=x.device)
            for keep in keeps:   # shorter lists first, longer ones for the descriptors they leave
                found, certified = shortlist(rows[todo], prep, m, keep)
                words[todo[certified]] = found[certified]
                todo = todo[~certified]
                if not len(todo):
                    break
            if len(todo):
                words[todo] = search_all(rows[todo].double(), prep, m)
            out.append(words)
        return torch.cat(out)

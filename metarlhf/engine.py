"""Multi-adapter generation: one batched decode loop, a different user's LoRA per row.

Algorithm
---------
One base causal LM is loaded once. Per-user policy adapters (LoRA, rank ``r`` on
``q_proj``/``v_proj``) live in a fixed number of pre-allocated *slots* managed by an LRU
cache keyed by ``(user, version)`` (:mod:`metarlhf.adapter_cache`). A miss reads the
adapter directory (``metarlhf.adapters.load_adapter``: safetensors + checksum + base,
rank and kind checks), validates every tensor name and shape, and copies the weights
into a free or least-recently-used slot; a hit reads nothing from disk. At most
``capacity`` adapters are ever resident, however many users are stored.

A batch of requests is left-padded and run through a hand-written decode loop with a
KV cache (``DynamicCache``): prefill computes logits for the last position only, then
one token per step. Each row carries its slot index; rows that finish (EOS, a stop
string, or ``max_new_tokens``) are dropped from the batch and from the KV cache.

Two LoRA backends compute the per-row adapter delta ``x @ A_row^T @ B_row^T * s``:

* ``"stacked"`` (default): the slots are stacked tensors ``A[S, in, r]`` and
  ``B[S, r, out]`` per layer (scaling folded into ``B``). For each batch composition the
  U distinct adapters in use are gathered once into ``A_sel[in, U*r]`` and
  ``B_sel[U*r, out]`` plus a 0/1 row mask ``[b, 1, U*r]``; a forward hook on each target
  ``nn.Linear`` adds ``((x @ A_sel) * mask) @ B_sel``: two small dense GEMMs per layer
  whatever the number of distinct adapters (the punica/LoRAX BGMV idea in a CPU-friendly
  form; a ``__base__`` row has an all-zero mask). ``q_proj`` and ``v_proj`` read the same
  input, so their down-projections are computed in one matmul.
* ``"peft"``: the model is wrapped by peft with one named LoRA adapter per slot and each
  forward passes ``adapter_names=[...]`` (``"__base__"`` = no adapter). peft loops over the
  distinct adapters of the batch in every LoRA layer. Kept for comparison and as the
  reference implementation in tests.

Sampling is greedy (``temperature == 0``) or temperature + nucleus (top-p) sampling with a
per-row ``torch.Generator`` seeded from ``SamplingParams.seed``, so a row's sample does not
depend on the other rows in its batch. Any finite temperature > 0 is safe: the logits are
shifted to a maximum of 0 before the division, and temperatures below the smallest normal
float32 (~1.2e-38) decode greedily, the limit of sampling as the temperature goes to 0.
Prompts must be valid Unicode (no lone surrogates): anything else is a ``ConfigError``
for that request, raised before it reaches a batch. Stop strings are matched on the decoded text;
the returned text ends before the stop string. Chat requests are rendered with the
tokenizer's own chat template.

Simplifications
---------------
* CPU/GPU agnostic but not fused: no paged KV cache, no continuous batching (a batch runs
  until its last row finishes, but finished rows stop costing compute).
* Adapters must have exactly the engine's rank and only target the engine's modules;
  adapters of other ranks are refused rather than padded.
* Thread safety: one re-entrant lock serialises ``generate``, adapter loads, ``pin``,
  ``unpin`` and ``evict``. ``stream`` takes the lock once per decoded token, so other
  callers interleave with a running stream; the stream's adapter slot is reference-
  counted and cannot be evicted or reused until the stream ends.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from metarlhf.adapter_cache import AdapterCache, CacheFullError
from metarlhf.errors import AdapterError, ConfigError, MetaRLHFError, check_text
from metarlhf.runtime import model_device, unwrap_model

log = logging.getLogger(__name__)

BASE = "__base__"
#: Upper bound for ``SamplingParams.max_new_tokens``.
MAX_NEW_TOKENS_LIMIT = 4096
BACKENDS = ("stacked", "peft")
#: Older names still accepted ("bgmv" was the first name of the stacked backend).
BACKEND_ALIASES = {"bgmv": "stacked"}


# ---------------------------------------------------------------------------------------
# Request / result types
# ---------------------------------------------------------------------------------------
@dataclass
class SamplingParams:
    """How to decode one request. Invalid values raise ``ConfigError`` naming the field."""

    max_new_tokens: int = 64  # 1 .. MAX_NEW_TOKENS_LIMIT
    temperature: float = 0.0  # 0 = greedy; > 0 = sample from softmax(logits / temperature) (< 1.2e-38: greedy)
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 = no truncation
    stop: list[str] = field(default_factory=list)  # stop strings; a str is one stop string
    seed: int | None = None  # per-row sampling seed; None = fresh randomness

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_NEW_TOKENS_LIMIT:
            raise ConfigError(f"max_new_tokens must be an int in [1, {MAX_NEW_TOKENS_LIMIT}], got {n!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or math.isnan(t) or math.isinf(t) or t < 0:
            raise ConfigError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        self.temperature = float(t)
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, int | float) or math.isnan(p) or not 0 < p <= 1:
            raise ConfigError(f"top_p must be a number in (0, 1], got {p!r}")
        self.top_p = float(p)
        stop = self.stop
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list | tuple) or not all(isinstance(s, str) for s in stop):
            raise ConfigError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if any(s == "" for s in stop):
            raise ConfigError("stop strings must be non-empty")
        if len(stop) > 16:
            raise ConfigError(f"stop takes at most 16 strings, got {len(stop)}")
        self.stop = list(stop)
        s = self.seed
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63):
            raise ConfigError(f"seed must be None or an int in [0, 2**63), got {s!r}")


@dataclass(frozen=True)
class AdapterRef:
    """Which adapter a row uses: ``(user, version)`` is the cache key, ``path`` its directory.

    A request with ``adapter=None`` (or ``user == "__base__"``) uses the base model.
    """

    user: str
    version: int
    path: str

    def __post_init__(self) -> None:
        if not isinstance(self.user, str) or not self.user:
            raise ConfigError(f"adapter user must be a non-empty string, got {self.user!r}")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 0:
            raise ConfigError(f"adapter version must be an int >= 0, got {self.version!r}")
        if self.user != BASE and not isinstance(self.path, str | os.PathLike):
            raise ConfigError(f"adapter path must be a path, got {self.path!r}")

    @property
    def key(self) -> tuple[str, int]:
        return (self.user, self.version)

    @property
    def is_base(self) -> bool:
        return self.user == BASE


def _is_base(ref: AdapterRef | str | None) -> bool:
    return ref is None or ref == BASE or (isinstance(ref, AdapterRef) and ref.is_base)


@dataclass
class GenerationRequest:
    """One prompt: chat ``messages`` (rendered by the chat template) or a raw ``prompt``."""

    messages: list[dict] | None = None
    prompt: str | None = None
    adapter: AdapterRef | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    # Streaming inside a batch: called (on the engine's thread) with each new piece of
    # text as it is decoded; stop strings are never passed on. None: no streaming.
    on_text: Callable[[str], None] | None = field(default=None, repr=False, compare=False)
    # Set (from any thread) to stop this row early, e.g. when a streaming client has gone:
    # the row leaves the batch at the next decode step with ``finish_reason="cancelled"``
    # and the other rows go on. None: the row cannot be cancelled.
    cancel: threading.Event | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ConfigError("give exactly one of messages (chat) or prompt (raw text)")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise ConfigError(f"prompt must be a string, got {type(self.prompt).__name__}")
        if self.prompt is not None:
            check_text(self.prompt, "prompt")
        if self.messages is not None:
            if not isinstance(self.messages, list) or not self.messages:
                raise ConfigError("messages must be a non-empty list of {'role', 'content'} dicts")
            for i, m in enumerate(self.messages):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
                    m.get("content"), str
                ):
                    raise ConfigError(f"messages[{i}] must be a dict with string 'role' and 'content'")
                check_text(m["role"], f"messages[{i}].role")
                check_text(m["content"], f"messages[{i}].content")
        if not (self.adapter is None or self.adapter == BASE or isinstance(self.adapter, AdapterRef)):
            raise ConfigError(f"adapter must be an AdapterRef, '__base__' or None, got {self.adapter!r}")
        if not isinstance(self.params, SamplingParams):
            raise ConfigError(f"params must be SamplingParams, got {type(self.params).__name__}")


@dataclass
class GenerationResult:
    """Output of one request. ``finish_reason`` is ``"stop"`` (EOS or a stop string),
    ``"length"`` (hit ``max_new_tokens``), ``"cancelled"`` (the request's ``cancel`` event
    was set; ``text`` is what was decoded until then) or ``"error"`` (then ``error`` says why and
    nothing was generated for this row; the other rows of the batch are unaffected)."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    error: MetaRLHFError | None = None


# ---------------------------------------------------------------------------------------
# Pure helpers: sampling and stop strings
# ---------------------------------------------------------------------------------------
def top_p_mask(probs: Any, top_p: float) -> Any:
    """Boolean mask ``[V]`` of the smallest set of tokens whose probability mass >= top_p.

    The most likely token is always kept. Ties at the boundary are resolved by sort order.
    """
    import torch

    if top_p >= 1.0:
        return torch.ones_like(probs, dtype=torch.bool)
    sorted_p, order = torch.sort(probs, descending=True)  # [V]
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly before each token
    keep_sorted = before < top_p  # the token that crosses top_p is kept
    keep_sorted[0] = True
    mask = torch.zeros_like(probs, dtype=torch.bool)
    mask[order] = keep_sorted
    return mask


#: Temperatures below this (the smallest normal float32) decode greedily: ``logits / t``
#: cannot be formed in float32 there, and softmax(logits / t) is the argmax in the limit.
MIN_SAMPLING_TEMPERATURE = 1.1754943508222875e-38


def sample_token(logits: Any, temperature: float, top_p: float, generator: Any = None) -> int:
    """Next token id from logits ``[V]``: argmax if temperature == 0, else nucleus sampling.

    Numerically safe for any finite temperature > 0: the logits are shifted so the largest
    is 0 before dividing (float32), so a tiny temperature sends the others to -inf instead
    of overflowing to inf - inf = NaN; below :data:`MIN_SAMPLING_TEMPERATURE` it is greedy.
    """
    import torch

    if temperature < MIN_SAMPLING_TEMPERATURE:
        return int(torch.argmax(logits))
    z = logits.float()
    z = (z - z.max()) / temperature  # [V], <= 0, the max is 0
    probs = torch.softmax(z, dim=-1)  # [V]
    probs = torch.where(top_p_mask(probs, top_p), probs, torch.zeros_like(probs))
    return int(torch.multinomial(probs, 1, generator=generator))


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Index where the earliest stop string starts in ``text``, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def stop_holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string.

    A stream must hold these characters back: the next token may complete the stop.
    """
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def safe_stream_end(text: str, stops: Sequence[str], final: bool) -> int:
    """How many characters of the decoded ``text`` a stream may emit now."""
    if final:
        return len(text)
    # A trailing U+FFFD is an incomplete multi-byte character: wait for the next token. It is
    # taken off first, so that what is left can end in a stop string's prefix ("ok" of "ok😀",
    # while the emoji is half decoded) and be held back too; before, "ok" went out and the stop
    # cut it from the final text.
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    return end - stop_holdback(text[:end], stops)


# ---------------------------------------------------------------------------------------
# LoRA backends: where slot weights live and how a forward applies them per row
# ---------------------------------------------------------------------------------------
def cache_keyword(model: Any) -> str:
    """The keyword under which ``model.forward`` takes the KV cache: ``cache`` in recent
    transformers, ``past_key_values`` before. A wrong name would land in ``**kwargs``
    unnoticed and every decode step would run without its context."""
    base = unwrap_model(model)
    params = inspect.signature(base.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise ConfigError(f"{type(base).__name__}.forward takes neither `cache` nor `past_key_values`: "
                      "the engine cannot hand it a KV cache")


def find_target_linears(model: Any, target_modules: Sequence[str]) -> dict[str, Any]:
    """``{module_name: nn.Linear}`` for every Linear whose last name part is a target."""
    import torch

    found = {
        name: mod
        for name, mod in model.named_modules()
        if name.rsplit(".", 1)[-1] in target_modules and isinstance(mod, torch.nn.Linear)
    }
    if not found:
        raise ConfigError(f"model has no Linear modules named {list(target_modules)}")
    return found


def lora_delta(x: Any, a_sel: Any, b_sel: Any, mask: Any) -> Any:
    """Per-row LoRA delta for a batch using U distinct adapters, as two dense GEMMs.

    x ``[b, t, in]``; a_sel ``[in, U*r]`` (the U adapters' A^T side by side); b_sel
    ``[U*r, out]`` (their B^T stacked, scaling folded in); mask ``[b, 1, U*r]`` is 1 on the
    r columns of the row's own adapter and 0 elsewhere (all 0 for a base row).
    Returns ``[b, t, out]`` = ``x @ A_row^T @ B_row^T * scaling`` for every row.
    """
    import torch

    h = torch.matmul(x, a_sel) * mask  # [b, t, U*r]: every adapter's down-projection, masked to the row's own
    return torch.matmul(h, b_sel)  # [b, t, out]


class StackedLoRABank:
    """Slot weights stacked per layer + forward hooks adding a per-row LoRA delta.

    ``A[name]`` is ``[S, in, r]`` and ``B[name]`` is ``[S, r, out]`` (scaling folded in). For a
    batch, the U distinct slots it uses are gathered once into ``a_sel [in, U*r]`` and
    ``b_sel [U*r, out]`` and each hooked ``nn.Linear`` adds :func:`lora_delta`: two small
    dense GEMMs per layer however many different adapters the batch mixes (the
    BGMV/punica idea, in a form that suits CPUs, where many tiny per-row matmuls cost more
    in dispatch than in arithmetic).

    Target modules that share a parent and an input width (``q_proj`` and ``v_proj`` of
    one attention block read the same hidden states) form a *group*: the first hook of
    a group computes the down-projection of all its modules at once (``A`` side by side)
    and the others reuse it when they see the same input tensor, so a Llama layer costs
    one ``matmul`` + one ``mul`` + one ``addmm_`` per module instead of two GEMMs each. Each
    module's up-projection ``b_pad`` is zero outside its own block, so reusing or
    recomputing the shared ``h`` gives the same result. The hooks are inert outside
    ``forward_rows``.
    """

    name = "stacked"

    def __init__(self, model: Any, capacity: int, rank: int, target_modules: Sequence[str]) -> None:
        import torch

        self.model = model
        self.rank = rank
        self.linears = find_target_linears(model, target_modules)
        p = next(model.parameters())
        self.dtype = p.dtype
        self.A: dict[str, Any] = {}  # name -> [S, in, r]
        self.B: dict[str, Any] = {}  # name -> [S, r, out]
        self.groups: dict[tuple[str, int], list[str]] = {}  # (parent, in) -> module names
        self._group_of: dict[str, tuple[str, int]] = {}
        self._sel_key: tuple[int, ...] | None = None
        self._sel: dict[str, Any] | None = None  # per-batch gathered weights + masks
        self._active: dict[str, Any] | None = None  # set only inside forward_rows
        self._h: dict[tuple[str, int], tuple[Any, Any]] = {}  # group -> (input x, masked h)
        self._hooks = []
        for name, lin in self.linears.items():
            self.A[name] = torch.zeros(capacity, lin.in_features, rank, dtype=p.dtype, device=p.device)
            self.B[name] = torch.zeros(capacity, rank, lin.out_features, dtype=p.dtype, device=p.device)
            g = (name.rsplit(".", 1)[0] if "." in name else "", lin.in_features)
            self.groups.setdefault(g, []).append(name)
            self._group_of[name] = g
            self._hooks.append(lin.register_forward_hook(self._make_hook(name)))

    def _make_hook(self, name: str) -> Callable:
        import torch

        g = self._group_of[name]

        def hook(module: Any, inputs: tuple, output: Any) -> Any:
            if self._active is None:
                return output
            x = inputs[0]  # [b, t, in]
            a_sel, mask = self._active["a"][g], self._active["mask"][g]  # [in, K], [b, 1, K]
            if x.shape[0] != mask.shape[0]:
                raise RuntimeError(f"LoRA rows set for batch {mask.shape[0]}, got batch {x.shape[0]}")
            cached = self._h.get(g)
            if cached is not None and cached[0] is x:
                h = cached[1]
            else:
                h = torch.matmul(x, a_sel).mul_(mask)  # [b, t, K]: the group's down-projections, row-masked
                self._h[g] = (x, h)
            b_pad = self._active["b"][name]  # [K, out], zero outside this module's block
            if output.is_contiguous():
                output.view(-1, output.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), b_pad)
                return output
            return output + torch.matmul(h, b_pad)

        return hook

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {n: (lin.in_features, lin.out_features) for n, lin in self.linears.items()}

    def write(self, slot: int, weights: dict[str, tuple[Any, Any, float]]) -> None:
        """Copy ``{module: (A [r, in], B [out, r], scaling)}`` into ``slot`` (others zeroed)."""
        self._sel_key = self._sel = None
        for name in self.linears:
            if name in weights:
                a, b, s = weights[name]
                self.A[name][slot].copy_(a.t())
                self.B[name][slot].copy_(b.t() * s)
            else:
                self.A[name][slot].zero_()
                self.B[name][slot].zero_()

    def clear(self, slot: int) -> None:
        self.write(slot, {})

    def _select(self, slots: Sequence[int | None]) -> dict[str, Any] | None:
        import torch

        key = tuple(-1 if s is None else s for s in slots)
        if key == self._sel_key:
            return self._sel
        used = sorted({s for s in slots if s is not None})
        sel = None
        if used:
            r, u = self.rank, len(used)
            col = {s: j for j, s in enumerate(used)}
            dev = next(iter(self.A.values())).device
            mask = torch.zeros(len(slots), 1, u * r, dtype=self.dtype, device=dev)  # [b, 1, U*r]
            for i, s in enumerate(slots):
                if s is not None:
                    mask[i, 0, col[s] * r : (col[s] + 1) * r] = 1
            idx = torch.tensor(used, device=dev)
            sel = {"a": {}, "mask": {}, "b": {}}
            for g, names in self.groups.items():
                k = len(names)
                a_parts = [self.A[n][idx].permute(1, 0, 2).reshape(g[1], u * r) for n in names]  # [in, U*r] each
                sel["a"][g] = torch.cat(a_parts, dim=1)  # [in, k*U*r]
                sel["mask"][g] = mask.repeat(1, 1, k)  # [b, 1, k*U*r]
                for j, n in enumerate(names):
                    out = self.linears[n].out_features
                    b_pad = torch.zeros(k * u * r, out, dtype=self.dtype, device=dev)  # [k*U*r, out]
                    b_pad[j * u * r : (j + 1) * u * r] = self.B[n][idx].reshape(u * r, out)
                    sel["b"][n] = b_pad
        self._sel_key, self._sel = key, sel
        return sel

    @contextmanager
    def forward_rows(self, slots: Sequence[int | None]) -> Iterator[dict[str, Any]]:
        """Within this block, forwards apply slot ``slots[i]`` to row i (None = base)."""
        self._active = self._select(slots)
        try:
            yield {}
        finally:
            self._active = None
            self._h = {}

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._active = self._sel = self._sel_key = None


class PeftBank:
    """peft LoRA model with one named adapter per slot; rows pick them via ``adapter_names``."""

    name = "peft"

    def __init__(self, model: Any, capacity: int, rank: int, target_modules: Sequence[str]) -> None:
        from peft import LoraConfig, get_peft_model

        linears = find_target_linears(model, target_modules)
        self._shapes = {n: (lin.in_features, lin.out_features) for n, lin in linears.items()}
        cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(target_modules))
        self.model = get_peft_model(model, cfg, adapter_name="slot0")
        for i in range(1, capacity):
            self.model.add_adapter(f"slot{i}", cfg)
        self.model.eval()
        mods = dict(self.model.base_model.model.named_modules())
        self._layers = {n: mods[n] for n in self._shapes}  # name -> peft lora.Linear
        self._names: list[str] = []

    def shapes(self) -> dict[str, tuple[int, int]]:
        return dict(self._shapes)

    def write(self, slot: int, weights: dict[str, tuple[Any, Any, float]]) -> None:
        an = f"slot{slot}"
        for name, layer in self._layers.items():
            if name in weights:
                a, b, s = weights[name]
                layer.lora_A[an].weight.data.copy_(a)
                layer.lora_B[an].weight.data.copy_(b)
                layer.scaling[an] = s
            else:
                layer.lora_A[an].weight.data.zero_()
                layer.lora_B[an].weight.data.zero_()

    def clear(self, slot: int) -> None:
        self.write(slot, {})

    @contextmanager
    def forward_rows(self, slots: Sequence[int | None]) -> Iterator[dict[str, Any]]:
        yield {"adapter_names": [BASE if s is None else f"slot{s}" for s in slots]}

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------
@dataclass
class _Row:
    """Decode state of one request."""

    index: int  # position in the caller's request list
    ids: list[int]  # prompt token ids
    params: SamplingParams
    slot: int | None  # None = base model
    generator: Any = None
    out: list[int] = field(default_factory=list)
    text: str = ""
    finish: str | None = None
    emitted: int = 0  # characters already streamed
    on_text: Callable[[str], None] | None = None
    cancel: threading.Event | None = None

    def emit(self) -> str:
        """The text that is now safe to stream (never a possible stop-string prefix)."""
        end = safe_stream_end(self.text, self.params.stop, final=self.finish is not None)
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta


def _strip_peft_key(key: str) -> tuple[str, str] | None:
    """``base_model.model.<module>.lora_A[.<adapter>].weight`` -> ``(<module>, "A")``."""
    for prefix in ("base_model.model.",):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    parts = key.split(".")
    if len(parts) < 3 or parts[-1] != "weight":
        return None
    for i in (len(parts) - 2, len(parts) - 3):
        if i > 0 and parts[i] in ("lora_A", "lora_B"):
            return ".".join(parts[:i]), parts[i][-1]
    return None


class MultiAdapterEngine:
    """Batched generation where each row may use a different user's LoRA adapter."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        base_name: str,
        capacity: int = 32,
        rank: int = 8,
        target_modules: Sequence[str] = ("q_proj", "v_proj"),
        max_context: int | None = None,
        backend: str = "stacked",
    ) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(f"capacity must be an int >= 1, got {capacity!r}")
        backend = BACKEND_ALIASES.get(backend, backend)
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"rank must be an int >= 1, got {rank!r}")
        if not isinstance(base_name, str) or not base_name:
            raise ConfigError("base_name must be a non-empty string (stamped into adapters as base_model)")
        if max_context is None:
            max_context = getattr(model.config, "max_position_embeddings", None) or 2048
        if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 2:
            raise ConfigError(f"max_context must be an int >= 2, got {max_context!r}")
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.rank = rank
        self.target_modules = tuple(target_modules)
        self.max_context = max_context
        self.backend = backend
        model.eval()
        bank_cls = StackedLoRABank if backend == "stacked" else PeftBank
        self._bank = bank_cls(model, capacity, rank, self.target_modules)
        self.model = self._bank.model
        self._shapes = self._bank.shapes()
        self._cache = AdapterCache(capacity, load=self._load_into_slot, clear=self._bank.clear)
        self._lock = threading.RLock()
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._cache_kw = cache_keyword(model)
        eos = set()
        for e in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
            if isinstance(e, int):
                eos.add(e)
            elif isinstance(e, list | tuple):
                eos.update(int(x) for x in e)
        self.eos_ids = frozenset(eos)
        self.generated_tokens = 0
        self._last_stats: dict[str, Any] = {}
        self._last_stats = self.stats

    @classmethod
    def from_pretrained(cls, model_dir: str | None = None, device: str = "cpu", **kw: Any) -> MultiAdapterEngine:
        """Load the policy with ``metarlhf.models.load_policy`` (None = embedded SmolLM2) onto ``device``."""
        from metarlhf.models import DEFAULT_POLICY_NAME, load_policy, model_name

        model, tok = load_policy(model_dir, device=device)
        kw.setdefault("base_name", model_name(model_dir, DEFAULT_POLICY_NAME))
        return cls(model, tok, **kw)

    # -- adapter cache -------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self._cache.capacity

    @property
    def stats(self) -> dict[str, Any]:
        """Cache counters: hits, misses, resident, capacity, pinned, evictions, load_errors,
        load_ms (mean per miss), load_ms_last, load_ms_max; plus backend, generated_tokens.

        Never blocks for long: while a generation holds the engine, the last snapshot
        taken is returned (so a metrics endpoint does not wait for a batch to finish).
        """
        if not self._lock.acquire(timeout=0.05):
            return dict(self._last_stats)
        try:
            s = self._cache.snapshot()
            s["backend"] = self.backend
            s["device"] = str(self._device)
            s["generated_tokens"] = self.generated_tokens
            self._last_stats = s
            return dict(s)
        finally:
            self._lock.release()

    @property
    def resident(self) -> list[tuple[str, int]]:
        """Resident ``(user, version)`` keys, least recently used first."""
        with self._lock:
            return self._cache.resident

    def _read_adapter(self, ref: AdapterRef) -> dict[str, tuple[Any, Any, float]]:
        """Load and fully validate an adapter; returns ``{module: (A, B, scaling)}``."""
        import torch

        from metarlhf.adapters import load_adapter

        try:
            ad = load_adapter(ref.path, expect_base=self.base_name, expect_rank=self.rank, expect_kind="policy")
        except AdapterError as e:
            raise AdapterError(f"adapter for user {ref.user!r} v{ref.version}: {e}") from e
        except OSError as e:
            raise AdapterError(f"adapter for user {ref.user!r} v{ref.version} at {ref.path!r}: unreadable: {e}") from e
        where = f"adapter for user {ref.user!r} v{ref.version} at {str(ref.path)!r}"
        cfg = ad.config
        if str(cfg.get("peft_type", "LORA")).upper() != "LORA" or cfg.get("use_dora"):
            raise AdapterError(f"{where}: only plain LoRA adapters are supported (peft_type=LORA, no DoRA)")
        targets = cfg.get("target_modules")
        if isinstance(targets, str):
            targets = [targets]
        if not targets or not set(targets) <= set(self.target_modules):
            raise AdapterError(f"{where}: targets {targets}, but the engine serves {list(self.target_modules)}")
        r = self.rank
        alpha = cfg.get("lora_alpha", r)
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
            raise AdapterError(f"{where}: lora_alpha must be a number, got {alpha!r}")
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        parts: dict[str, dict[str, Any]] = {}
        for key, t in ad.tensors.items():
            parsed = _strip_peft_key(key)
            if parsed is None or parsed[0] not in self._shapes:
                raise AdapterError(f"{where}: tensor {key!r} does not match a {list(self.target_modules)} LoRA layer "
                                   "of this base model")
            parts.setdefault(parsed[0], {})[parsed[1]] = t
        if not parts:
            raise AdapterError(f"{where}: no LoRA tensors")
        out: dict[str, tuple[Any, Any, float]] = {}
        dtype = next(self.model.parameters()).dtype
        for name, ab in parts.items():
            if set(ab) != {"A", "B"}:
                raise AdapterError(f"{where}: layer {name!r} has lora_{'A' if 'A' not in ab else 'B'} missing")
            fan_in, fan_out = self._shapes[name]
            a, b = ab["A"], ab["B"]
            if tuple(a.shape) != (r, fan_in) or tuple(b.shape) != (fan_out, r):
                raise AdapterError(
                    f"{where}: layer {name!r} has shapes A{tuple(a.shape)} B{tuple(b.shape)}, "
                    f"expected A{(r, fan_in)} B{(fan_out, r)}"
                )
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise AdapterError(f"{where}: layer {name!r} has NaN or infinite weights")
            out[name] = (a.to(dtype), b.to(dtype), float(scaling))
        return out

    def _load_into_slot(self, key: tuple[str, int], ref: AdapterRef, slot: int) -> None:
        import torch

        weights = self._read_adapter(ref)  # validates everything before touching the slot
        with torch.no_grad():
            self._bank.write(slot, weights)

    def preload(self, ref: AdapterRef) -> None:
        """Make ``ref`` resident now (a miss loads it); raises ``AdapterError`` if it is bad."""
        if _is_base(ref):
            return
        with self._lock:
            slot = self._cache.acquire(ref.key, ref)
            self._cache.release(ref.key, slot)

    def pin(self, ref: AdapterRef) -> None:
        """Load ``ref`` if needed and keep it resident until ``unpin``. Idempotent."""
        if _is_base(ref):
            return
        with self._lock:
            self._cache.pin(ref.key, ref)

    def unpin(self, ref: AdapterRef) -> None:
        if _is_base(ref):
            return
        with self._lock:
            self._cache.unpin(ref.key)

    def evict(self, user: str) -> int:
        """Drop every resident version of ``user``; returns how many were dropped."""
        with self._lock:
            return self._cache.evict_user(user)

    # -- request preparation -------------------------------------------------------------
    def encode(self, request: GenerationRequest) -> list[int]:
        """Prompt token ids; chat messages go through the tokenizer's chat template."""
        tok = self.tokenizer
        if request.messages is not None:
            if not getattr(tok, "chat_template", None):
                raise ConfigError("this tokenizer has no chat template; send a raw prompt instead")
            try:
                text = tok.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
            except Exception as e:  # noqa: BLE001 - jinja raises many types on odd input
                raise ConfigError(f"messages cannot be rendered by the chat template: {e}") from e
            check_text(text, "the rendered chat prompt")
            ids = self._tokenize(text, add_special_tokens=False)
        else:
            check_text(request.prompt, "prompt")
            ids = self._tokenize(request.prompt)
        if not ids:
            raise ConfigError("prompt is empty")
        limit = self.max_context - request.params.max_new_tokens
        if len(ids) > limit:
            raise ConfigError(
                f"prompt has {len(ids)} tokens; with max_new_tokens={request.params.max_new_tokens} the limit is "
                f"{limit} (max_context={self.max_context})"
            )
        return ids

    def _tokenize(self, text: str, **kw: Any) -> list[int]:
        """Token ids of ``text``; text the tokenizer rejects is a ``ConfigError`` for this request."""
        try:
            return list(self.tokenizer(text, **kw)["input_ids"])
        except (TypeError, ValueError) as e:  # e.g. the fast tokenizer on text it cannot take
            raise ConfigError(f"prompt cannot be tokenized: {e}") from e

    def _new_row(self, i: int, req: GenerationRequest, ids: list[int], slot: int | None) -> _Row:
        import torch

        gen = None
        if req.params.temperature > 0:
            gen = torch.Generator(device=self._device)
            gen.manual_seed(req.params.seed if req.params.seed is not None else secrets.randbits(63))
        return _Row(index=i, ids=ids, params=req.params, slot=slot, generator=gen, on_text=req.on_text,
                    cancel=req.cancel)

    @property
    def _device(self) -> Any:
        return model_device(self.model)

    def _error(self, ids: list[int] | None, e: MetaRLHFError) -> GenerationResult:
        return GenerationResult("", [], len(ids or []), 0, "error", error=e)

    def _result(self, row: _Row) -> GenerationResult:
        return GenerationResult(row.text, list(row.out), len(row.ids), len(row.out), row.finish or "length")

    # -- generation ----------------------------------------------------------------------
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Generate for all requests in one batched decode loop (mixed adapters).

        A request whose adapter cannot be loaded, or whose prompt is too long, gets a
        result with ``finish_reason="error"`` and ``error`` set; the other rows are served.
        If more distinct adapters are needed than free slots, the batch runs in waves.
        """
        if not isinstance(requests, list | tuple) or not all(isinstance(r, GenerationRequest) for r in requests):
            raise ConfigError("generate() takes a list of GenerationRequest")
        results: list[GenerationResult | None] = [None] * len(requests)
        encoded: dict[int, list[int]] = {}
        for i, req in enumerate(requests):
            try:
                encoded[i] = self.encode(req)
            except MetaRLHFError as e:
                results[i] = self._error(None, e)
        with self._lock:
            pending = [i for i in range(len(requests)) if results[i] is None]
            while pending:
                rows, held, deferred, full = [], {}, [], False
                for i in pending:
                    if requests[i].cancel is not None and requests[i].cancel.is_set():  # gone before its wave
                        results[i] = GenerationResult("", [], len(encoded[i]), 0, "cancelled")
                        continue
                    ref = requests[i].adapter
                    slot = None
                    if not _is_base(ref):
                        if ref.key in held:
                            slot = held[ref.key]
                        elif full:
                            deferred.append(i)
                            continue
                        else:
                            try:
                                slot = self._cache.acquire(ref.key, ref)
                            except CacheFullError as e:
                                full = True
                                if rows:
                                    deferred.append(i)  # next wave, once this one releases its slots
                                else:
                                    results[i] = self._error(encoded[i], e)
                                continue
                            except MetaRLHFError as e:
                                results[i] = self._error(encoded[i], e)
                                continue
                            held[ref.key] = slot
                    rows.append(self._new_row(i, requests[i], encoded[i], slot))
                streaming = [r for r in rows if r.on_text is not None]
                try:
                    for _ in self._decode(rows):
                        for r in streaming:
                            self._push(r)
                finally:
                    for key, slot in held.items():
                        self._cache.release(key, slot)
                for row in rows:
                    results[row.index] = self._result(row)
                pending = deferred
        return results  # type: ignore[return-value]

    @staticmethod
    def _push(row: _Row) -> None:
        """Hand a streaming row's new text to its callback; a failing callback (client
        gone) is dropped without disturbing the batch."""
        delta = row.emit()
        if delta and row.on_text is not None:
            try:
                row.on_text(delta)
            except Exception:  # noqa: BLE001
                log.warning("stream callback failed; the row finishes without streaming", exc_info=True)
                row.on_text = None

    def generate_one(self, request: GenerationRequest) -> GenerationResult:
        """Generate for one request; raises its error instead of returning it."""
        res = self.generate([request])[0]
        if res.error is not None:
            raise res.error
        return res

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        """Yield text deltas for one request as tokens are decoded.

        The request is validated and its adapter loaded before this returns, so errors
        (``ConfigError``, ``AdapterError``) are raised here, not mid-stream; the one exception
        is an adapter evicted from the cache *and* removed from disk before the first
        ``next()``, whose reload fails there (the slot is taken at the first ``next()``, so a
        generator that is never started holds none). Stop strings
        are never emitted (text that might start one is held back). The generator's
        return value (``StopIteration.value``) is the final ``GenerationResult``.
        """
        if not isinstance(request, GenerationRequest):
            raise ConfigError("stream() takes a GenerationRequest")
        ids = self.encode(request)
        self.preload(request.adapter)
        return self._stream(request, ids)

    def _stream(self, request: GenerationRequest, ids: list[int]) -> Iterator[str]:
        ref = request.adapter
        slot = None
        with self._lock:
            if not _is_base(ref):
                slot = self._cache.acquire(ref.key, ref)
            row = self._new_row(0, request, ids, slot)
            steps = self._decode([row])
        try:
            while True:
                with self._lock:
                    try:
                        next(steps)
                    except StopIteration:
                        break
                delta = row.emit()
                if delta:
                    yield delta
        finally:
            steps.close()
            if slot is not None:
                with self._lock:
                    self._cache.release(ref.key, slot)
        if row.emitted < len(row.text):
            yield row.text[row.emitted :]
        return self._result(row)

    def _decode(self, rows: list[_Row]) -> Iterator[None]:
        """Decode ``rows`` together; yields after the prefill and after every step.

        Callers hold ``self._lock`` while advancing this generator.
        """
        import torch
        from transformers import DynamicCache

        if not rows:
            return
        dev = self._device
        tok = self.tokenizer
        width = max(len(r.ids) for r in rows)
        input_ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long, device=dev)  # [b, t]
        attn = torch.zeros((len(rows), width), dtype=torch.long, device=dev)  # [b, t]
        for j, r in enumerate(rows):  # left padding
            input_ids[j, width - len(r.ids) :] = torch.tensor(r.ids, device=dev)
            attn[j, width - len(r.ids) :] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)  # [b, t]
        cache = DynamicCache()
        active = list(rows)
        with torch.inference_mode():
            with self._bank.forward_rows([r.slot for r in active]) as kw:
                logits = self.model(
                    input_ids=input_ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1,
                    **{self._cache_kw: cache}, **kw,
                ).logits[:, -1, :]  # [b, V]
            last_pos = pos[:, -1]  # [b]
            while True:
                next_ids = self._choose(logits, active)  # [b]
                keep = []
                for j, r in enumerate(active):
                    self._advance(r, int(next_ids[j]), tok)
                    if r.finish is None and r.cancel is not None and r.cancel.is_set():
                        r.finish = "cancelled"
                    if r.finish is None:
                        keep.append(j)
                self.generated_tokens += len(active)
                yield
                if not keep:
                    return
                if len(keep) < len(active):  # drop finished rows from the batch and the cache
                    sel = torch.tensor(keep, device=dev)
                    cache.batch_select_indices(sel)
                    attn, last_pos, next_ids = attn[sel], last_pos[sel], next_ids[sel]
                    active = [active[j] for j in keep]
                attn = torch.cat([attn, attn.new_ones((len(active), 1))], dim=1)  # [b, t+1]
                last_pos = last_pos + 1
                with self._bank.forward_rows([r.slot for r in active]) as kw:
                    logits = self.model(
                        input_ids=next_ids[:, None], attention_mask=attn, position_ids=last_pos[:, None],
                        use_cache=True, **{self._cache_kw: cache}, **kw,
                    ).logits[:, -1, :]  # [b, V]

    def _choose(self, logits: Any, rows: list[_Row]) -> Any:
        import torch

        next_ids = torch.argmax(logits, dim=-1)  # [b]
        for j, r in enumerate(rows):
            if r.params.temperature > 0:
                next_ids[j] = sample_token(logits[j], r.params.temperature, r.params.top_p, r.generator)
        return next_ids

    def _advance(self, r: _Row, token: int, tok: Any) -> None:
        """Append one token to a row and decide whether it is finished."""
        if token in self.eos_ids:
            r.finish = "stop"
            return
        r.out.append(token)
        r.text = tok.decode(r.out, skip_special_tokens=True)
        if r.params.stop:
            cut = find_stop(r.text, r.params.stop)
            if cut >= 0:
                r.text = r.text[:cut]
                r.finish = "stop"
                return
        if len(r.out) >= r.params.max_new_tokens:
            r.finish = "length"

    def close(self) -> None:
        """Remove the engine's hooks from the model (stacked backend)."""
        with self._lock:
            self._bank.close()

"""Prompt-to-prompt attention control (Hertz et al.), host-agnostic.

An ``AttentionControl`` edits attention probabilities [B, H, Nq, Nk] inside every attention layer of
the eps network for a batch of rows grouped as [source, edit_1, …, edit_m] (m = ``n_edits``); a
classifier-free-guided call stacks several such groups ("chunks", ComfyUI's ``cond_or_uncond``:
0 = cond, 1 = uncond). By default only cond chunks are edited (as the NULL-text reference code).

- cross-attention (Nk = prompt tokens): for sampling steps i < cross_replace_steps·N the edit rows get
  the source's maps, mapped onto the edit prompt's tokens: word swap (``replace_mapper``, equal word
  counts), refinement (``refine_mapper``, added words keep their own maps), optionally reweighted
  per token (``token_scale``); single words may have their own window (``word_windows``, the
  reference's ``cross_replace_steps={"default_": .8, "dog": .4}``): outside it the word keeps the
  edit's own map;
- self-attention: for i < self_replace_steps·N the edit rows get the source's maps (only in layers with
  at most ``self_max_tokens`` queries; the reference uses 16×16 = 256 for SD1 at 512 px);
- local blending (``LocalBlend``): after each step the edit latents are kept equal to the source's
  outside a mask made from the cross-attention maps of given words (source ∪ edit words).

The host tells the controller the step (``begin_step``) before each UNet call and hands it the latents
after the step (``end_step``); ``models.nulltext.ddim_sample_cfg`` does both.

Hooks: ``apply_attention_control(module, controller)`` patches LDM-style attention modules
(``to_q``/``to_k``/``to_v``/``to_out``/``heads``; cross-attention when called with a context);
``attention_patch(controller, is_cross)`` builds a ComfyUI ``patches_replace`` function
``(q, k, v, extra_options) -> out`` (no ComfyUI import needed).

Tokens: prompts are ``TokenizedPrompt`` (words and their BPE ids, without start/end tokens);
``tokenize`` uses open_clip's bundled SimpleTokenizer (the BPE of SD1's CLIP ViT-L/14 and of SD2's
OpenCLIP). Position 0 of a 77-token sequence is the start token, so word tokens start at 1.
"""
from __future__ import annotations

import functools
import logging
import math
import types
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SOT, EOT = 49406, 49407
MAX_LEN = 77

__all__ = ["TokenizedPrompt", "tokenize", "align", "replace_mapper", "refine_mapper", "token_scale",
           "LocalBlend", "AttentionControl", "prompt_to_prompt", "controlled_attention",
           "apply_attention_control", "attention_patch", "comfy_block_keys"]


# --------------------------------------------------------------------------------------------- tokens
@dataclass(frozen=True)
class TokenizedPrompt:
    """A prompt as whitespace-separated words and the BPE ids of each word."""
    words: tuple[str, ...]
    tokens: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        if len(self.words) != len(self.tokens):
            raise ValueError(f"{len(self.words)} words but {len(self.tokens)} token lists")

    @classmethod
    def from_tokens(cls, words: Sequence[str], tokens: Sequence[Sequence[int]]) -> "TokenizedPrompt":
        return cls(tuple(words), tuple(tuple(int(t) for t in w) for w in tokens))

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    def ids(self, max_len: int = MAX_LEN, pad: int = EOT) -> list[int]:
        """[SOT, tokens…, EOT, pad…] of length max_len."""
        flat = [t for w in self.tokens for t in w]
        if len(flat) + 2 > max_len:
            raise ValueError(f"the prompt {' '.join(self.words)!r} has {len(flat)} tokens; at most "
                             f"{max_len - 2} fit: shorten it")
        return [SOT] + flat + [EOT] + [pad] * (max_len - len(flat) - 2)

    def spans(self) -> list[list[int]]:
        """Token positions of each word in the padded sequence (start token at 0)."""
        out, p = [], 1
        for w in self.tokens:
            out.append(list(range(p, p + len(w))))
            p += len(w)
        return out

    def positions(self, word: int | str) -> list[int]:
        """Token positions of word index ``word``, or of every occurrence of the word ``word``."""
        spans = self.spans()
        if isinstance(word, int):
            if not -len(spans) <= word < len(spans):
                raise ValueError(f"word index {word} out of range for {len(spans)} words")
            return spans[word]
        hits = [p for w, s in zip(self.words, spans) if _norm(w) == _norm(word) for p in s]
        if not hits:
            raise ValueError(f"word {word!r} is not in the prompt {' '.join(self.words)!r}")
        return hits


def _norm(w: str) -> str:
    return w.strip().lower().strip(".,;:!?\"'()")


@functools.lru_cache(maxsize=1)
def _simple_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer
    return SimpleTokenizer()


def tokenize(prompt: str, tokenizer=None) -> TokenizedPrompt:
    """Split on whitespace and BPE-encode each word (``tokenizer.encode(str) -> list[int]`` without
    start/end tokens; default open_clip's SimpleTokenizer, bundled, no download)."""
    tok = tokenizer or _simple_tokenizer()
    words = prompt.split()
    return TokenizedPrompt.from_tokens(words, [tok.encode(w) for w in words])


def align(x: Sequence[int], y: Sequence[int]) -> list[int]:
    """Global alignment (Needleman–Wunsch; match +1, mismatch −1, gap 0) of token sequences.
    Returns, for every position of y, the aligned position of x, or −1 where y has an insertion."""
    n, m = len(x), len(y)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            diag = score[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            score[i][j] = max(diag, score[i - 1][j], score[i][j - 1])
    out = [-1] * m
    i, j = n, m
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1] and score[i][j] == score[i - 1][j - 1] + 1:
            out[j - 1] = i - 1
            i, j = i - 1, j - 1
        elif score[i][j] == score[i - 1][j]:
            i -= 1
        elif score[i][j] == score[i][j - 1]:
            j -= 1
        else:  # mismatch on the diagonal: y[j-1] replaces x[i-1], no source for it
            i, j = i - 1, j - 1
    return out


def replace_mapper(source: TokenizedPrompt, target: TokenizedPrompt, max_len: int = MAX_LEN) -> torch.Tensor:
    """Word swap: M [L, L] with edit_map[..., t] = Σ_s source_map[..., s]·M[s, t].

    Prompts need the same number of words. Equal words (and swapped words of equal token count) map
    token to token; a swapped word of a different token count spreads the source word's attention
    evenly over the target word's tokens (M[s, t] = 1/len(target word), mass preserving). Start token,
    end token and padding map in order."""
    if len(source.words) != len(target.words):
        raise ValueError(f"a word swap needs prompts with the same number of words, got "
                         f"{len(source.words)} and {len(target.words)}: use refine for added words")
    source.ids(max_len), target.ids(max_len)  # length checks
    m = torch.zeros(max_len, max_len)
    m[0, 0] = 1
    i = j = 1
    for ts, td in zip(source.tokens, target.tokens):
        if len(ts) == len(td):
            for a, b in zip(range(i, i + len(ts)), range(j, j + len(td))):
                m[a, b] = 1
        else:
            m[i:i + len(ts), j:j + len(td)] = 1.0 / len(td)
        i, j = i + len(ts), j + len(td)
    for d in range(max_len - max(i, j)):  # end token and padding
        m[i + d, j + d] = 1
    return m


def refine_mapper(source: TokenizedPrompt, target: TokenizedPrompt,
                  max_len: int = MAX_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """Refinement (added/changed words): (index LongTensor [L], alpha [L]); the edit's map at token t
    is source_map[..., index[t]] where alpha[t] = 1, and its own map where alpha[t] = 0 (new tokens)."""
    xs, ys = source.ids(max_len), target.ids(max_len)
    lx, ly = source.n_tokens + 2, target.n_tokens + 2
    a = align(xs[:lx], ys[:ly])
    index = torch.zeros(max_len, dtype=torch.long)
    alpha = torch.ones(max_len)
    for t, s in enumerate(a):
        if s < 0:
            alpha[t] = 0
        else:
            index[t] = s
    for d in range(max_len - ly):  # padding in order
        index[ly + d] = min(lx + d, max_len - 1)
    return index, alpha


def token_scale(prompt: TokenizedPrompt, weights: dict[int | str, float], max_len: int = MAX_LEN) -> torch.Tensor:
    """Reweighting: a per-token factor [L] (1 everywhere but the tokens of the given words)."""
    prompt.ids(max_len)
    s = torch.ones(max_len)
    for word, w in weights.items():
        s[prompt.positions(word)] = float(w)
    return s


# --------------------------------------------------------------------------------------------- control
def _window(steps: float | tuple[float, float]) -> tuple[float, float]:
    if isinstance(steps, (int, float)):
        steps = (0.0, float(steps))
    lo, hi = float(steps[0]), float(steps[1])
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"injection window {steps}: give a fraction in 0..1 or (start, end) with "
                         "0 <= start <= end <= 1")
    return lo, hi


def _in_window(w: tuple[float, float], i: int, n: int) -> bool:
    return int(w[0] * n) <= i < int(w[1] * n)


def _grid(n_q: int, shape: tuple[int, int]) -> tuple[int, int] | None:
    """The (h, w) of an attention layer with n_q queries in a UNet over a latent of ``shape``."""
    h, w = shape
    for d in range(8):
        hh, ww = math.ceil(h / 2 ** d), math.ceil(w / 2 ** d)
        if hh * ww == n_q:
            return hh, ww
    return None


class LocalBlend:
    """Keep the edit equal to the source outside the region of given words.

    ``words``: for every row of a group [source, edit_1…], the token positions whose cross-attention
    makes the mask. The maps (summed over the words, averaged over heads and layers, accumulated over
    the steps so far, as the reference) are max-pooled (3×3), resized to the latent, divided by their
    maximum and thresholded; edit j's mask is source-mask ∪ edit-j-mask. Applied from sampling step
    start·N on. ``max_tokens`` limits the layers used (reference: 16×16 = 256 for SD1 at 512 px).
    One mask for the whole batch: sample one source image (one group) per batch."""

    def __init__(self, words: Sequence[Sequence[int]], threshold: float = 0.3, start: float = 0.2,
                 max_tokens: int | None = None):
        if len(words) < 2:
            raise ValueError("local blending needs token positions for the source and each edit row")
        self.words = [list(w) for w in words]
        self.threshold, self.start, self.max_tokens = threshold, start, max_tokens
        self.reset()

    def reset(self):
        self._step: dict[int, list] = {}   # n_q -> [sum [g, n_q], count]
        self._acc: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None  # last mask [m, 1, H, W] (for display)

    def collect(self, attn: torch.Tensor):
        """attn: one cond group [g, H, Nq, Nk] (after editing)."""
        n_q = attn.shape[2]
        if self.max_tokens is not None and n_q > self.max_tokens:
            return
        maps = torch.stack([attn[r, :, :, w].sum(-1).mean(0) for r, w in enumerate(self.words)]).float()
        if n_q in self._step:
            self._step[n_q][0] += maps
            self._step[n_q][1] += 1
        else:
            self._step[n_q] = [maps, 1]

    def __call__(self, x: torch.Tensor, i: int, n: int) -> torch.Tensor:
        """x: the latents [k·g, C, H, W] after step i (k groups of [source, edits…])."""
        g = len(self.words)
        if not self._step:
            return x
        shape = tuple(x.shape[-2:])
        ups = []
        for n_q, (s, c) in self._step.items():
            hw = _grid(n_q, shape)
            if hw is None:
                continue
            m = (s / c).view(g, 1, *hw)
            m = F.max_pool2d(m, 3, stride=1, padding=1)
            ups.append(F.interpolate(m, size=shape, mode="nearest"))
        self._step = {}
        if not ups:
            return x
        step_map = torch.stack(ups).mean(0)
        self._acc = step_map if self._acc is None else self._acc + step_map
        if i < int(self.start * n):
            return x
        m = self._acc / self._acc.amax((2, 3), keepdim=True).clamp_min(1e-12)
        m = (m > self.threshold).float()
        mask = torch.maximum(m[:1], m[1:])  # [g−1, 1, H, W]
        self.mask = mask
        if x.shape[0] % g:
            raise ValueError(f"local blending: {x.shape[0]} latents are not groups of {g}")
        x = x.clone().view(-1, g, *x.shape[1:])
        src = x[:, :1]
        x[:, 1:] = src + mask.to(x.dtype)[None] * (x[:, 1:] - src)
        return x.view(-1, *x.shape[2:])


class AttentionControl:
    """Edits attention probabilities for groups [source, edit_1…edit_m] (see the module docstring).

    mapper: word swap, [m, L, L] (or [L, L]) from ``replace_mapper``;
    refine: (index [m, L] long, alpha [m, L]) from ``refine_mapper``;
    scale: reweighting, [m, L] (or [L]) from ``token_scale``;
    neither mapper nor refine: the edit's token positions are the source's (same prompt, or
    injection only). cross_/self_replace_steps: fraction of the sampling steps (from the start) or a
    (start, end) window. word_windows: per edit prompt, {token position of the edit prompt: window}
    overriding cross_replace_steps for those tokens. edit_uncond: also edit uncond chunks."""

    def __init__(self, n_edits: int = 1, *, mapper: torch.Tensor | None = None,
                 refine: tuple[torch.Tensor, torch.Tensor] | None = None, scale: torch.Tensor | None = None,
                 cross_replace_steps: float | tuple[float, float] = 0.8,
                 self_replace_steps: float | tuple[float, float] = 0.4, self_max_tokens: int | None = None,
                 local_blend: LocalBlend | None = None, edit_uncond: bool = False,
                 word_windows: Sequence[dict[int, float | tuple[float, float]]] | None = None):
        if n_edits < 1:
            raise ValueError("prompt-to-prompt needs at least one edit prompt")
        if mapper is not None and refine is not None:
            raise ValueError("give either a word-swap mapper or a refinement mapper, not both")
        self.n_edits = n_edits
        self.mapper = None if mapper is None else (mapper if mapper.ndim == 3 else mapper[None]).float()
        self.refine = None
        if refine is not None:
            idx, alpha = refine
            self.refine = ((idx if idx.ndim == 2 else idx[None]).long(),
                           (alpha if alpha.ndim == 2 else alpha[None]).float())
        self.scale = None if scale is None else (scale if scale.ndim == 2 else scale[None]).float()
        for name, v in (("mapper", self.mapper), ("refine", self.refine and self.refine[0]), ("scale", self.scale)):
            if v is not None and v.shape[0] != n_edits:
                raise ValueError(f"{name} is for {v.shape[0]} edit prompts but n_edits = {n_edits}")
        self.cross_window = _window(cross_replace_steps)
        self.word_windows = None
        if word_windows is not None:
            if len(word_windows) != n_edits:
                raise ValueError(f"word_windows has {len(word_windows)} entries but n_edits = {n_edits}")
            self.word_windows = [{int(p): _window(w) for p, w in ww.items()} for ww in word_windows]
        self.self_window = _window(self_replace_steps)
        self.self_max_tokens = self_max_tokens
        self.local_blend = local_blend
        if local_blend is not None and len(local_blend.words) != n_edits + 1:
            raise ValueError(f"local blending has words for {len(local_blend.words)} rows, "
                             f"the groups have {n_edits + 1}")
        self.edit_uncond = edit_uncond
        self.step, self.total = 0, None
        self.cond_or_uncond: list[int] | None = None
        self.latent_shape: tuple[int, int] | None = None

    @property
    def group(self) -> int:
        return 1 + self.n_edits

    # ---- host interface
    def reset(self):
        self.step, self.total, self.cond_or_uncond = 0, None, None
        if self.local_blend is not None:
            self.local_blend.reset()

    def begin_step(self, i: int, total: int, cond_or_uncond: list[int] | None = None,
                   latent_shape: tuple[int, int] | None = None):
        """Before the UNet call(s) of sampling step i of ``total``. cond_or_uncond: the chunk kinds
        of the coming batched call (ComfyUI passes its own in extra_options, which wins).
        Call ``reset()`` before each new sampling run."""
        self.step, self.total = i, total
        self.cond_or_uncond = cond_or_uncond
        if latent_shape is not None:
            self.latent_shape = latent_shape

    def end_step(self, x: torch.Tensor) -> torch.Tensor:
        """After step i: local blending of the latents [k·(1+m), C, H, W] (no-op without it)."""
        if self.local_blend is None:
            return x
        return self.local_blend(x, self.step, self.total)

    def wants(self, is_cross: bool, n_q: int) -> bool:
        """Whether this layer's probabilities may be edited or recorded now (else plain attention)."""
        if self.total is None:
            return False
        if is_cross:
            return self.local_blend is not None or self._cross_alpha() is not None
        return _in_window(self.self_window, self.step, self.total) and (
            self.self_max_tokens is None or n_q <= self.self_max_tokens)

    # ---- the edit
    def __call__(self, attn: torch.Tensor, is_cross: bool, place: str = "",
                 cond_or_uncond: list[int] | None = None) -> torch.Tensor:
        """attn [B, H, Nq, Nk] probabilities, B = chunks·(1+m) rows [source, edits…] per chunk."""
        if self.total is None:
            raise RuntimeError("the attention controller does not know the step: call "
                               "controller.begin_step(i, total) before each UNet call")
        b, _, n_q, n_k = attn.shape
        g = self.group
        if b % g:
            raise ValueError(f"attention batch {b} is not a multiple of {g} rows [source + "
                             f"{self.n_edits} edits]: sample the source and the edits together")
        # chunk kinds (0 cond, 1 uncond) over equal chunks of the batch, one per group of g rows
        kinds = cond_or_uncond if cond_or_uncond is not None else self.cond_or_uncond
        if kinds and b % len(kinds) == 0 and (b // len(kinds)) % g == 0:
            kinds = [kind for kind in kinds for _ in range(b // len(kinds) // g)]
        else:
            kinds = [0] * (b // g)
        alpha = self._cross_alpha(n_k) if is_cross else None
        cross_on = alpha is not None
        self_on = (not is_cross) and _in_window(self.self_window, self.step, self.total) and (
            self.self_max_tokens is None or n_q <= self.self_max_tokens)
        record = is_cross and self.local_blend is not None
        if not (cross_on or self_on or record):
            return attn
        chunks = list(attn.view(b // g, g, *attn.shape[1:]).unbind(0))
        for c, kind in enumerate(kinds):
            if kind != 0 and not self.edit_uncond:
                continue
            chunk = chunks[c]
            if cross_on:
                chunk = torch.cat([chunk[:1], self._cross(chunk[0], chunk[1:], n_k, alpha)])
            elif self_on:
                chunk = torch.cat([chunk[:1], chunk[:1].expand(self.n_edits, -1, -1, -1)])
            if record and kind == 0:
                self.local_blend.collect(chunk)
            chunks[c] = chunk
        return torch.stack(chunks).view(attn.shape)

    def _cross_alpha(self, n_k: int | None = None) -> torch.Tensor | bool | None:
        """Which edit tokens take the source's map at this step: None (none), True (all), or [m, Nk]
        (1 = the source's map, 0 = the edit's own) when some words have their own window."""
        on = _in_window(self.cross_window, self.step, self.total)
        if not self.word_windows:
            return True if on else None
        if n_k is None:  # only asking whether any token is on
            return True if on or any(_in_window(w, self.step, self.total)
                                     for ww in self.word_windows for w in ww.values()) else None
        alpha = torch.full((self.n_edits, n_k), float(on))
        for e, ww in enumerate(self.word_windows):
            for pos, w in ww.items():
                if pos < n_k:
                    alpha[e, pos] = float(_in_window(w, self.step, self.total))
        return alpha if alpha.any() else None

    def _cross(self, base: torch.Tensor, edits: torch.Tensor, n_k: int,
               window: torch.Tensor | bool = True) -> torch.Tensor:
        """base [H, Nq, Nk], edits [m, H, Nq, Nk] → new edit maps (window: see ``_cross_alpha``)."""
        for name, v in (("mapper", self.mapper), ("refine", self.refine and self.refine[0]),
                        ("scale", self.scale)):
            if v is not None and v.shape[-1] != n_k:
                raise ValueError(f"the {name} is for {v.shape[-1]}-token prompts but the cross-attention "
                                 f"has {n_k} tokens: build it with max_len={n_k}")
        if self.mapper is not None:
            new = torch.einsum("hqs,mst->mhqt", base, self.mapper.to(base))
        elif self.refine is not None:
            idx, alpha = self.refine
            alpha = alpha.to(base)[:, None, None, :]
            new = torch.stack([base[:, :, ix] for ix in idx.to(base.device)]) * alpha + edits * (1 - alpha)
        else:
            new = base[None].expand_as(edits)
        if self.scale is not None:
            new = new * self.scale.to(base)[:, None, None, :]
        if isinstance(window, torch.Tensor):
            a = window.to(base)[:, None, None, :]
            new = new * a + edits * (1 - a)
        return new


def prompt_to_prompt(source: TokenizedPrompt, edits: Sequence[TokenizedPrompt], mode: str = "replace", *,
                     reweight: dict[int | str, float] | None = None,
                     cross_replace_steps: float | tuple[float, float] | dict = 0.8,
                     self_replace_steps: float | tuple[float, float] = 0.4, self_max_tokens: int | None = None,
                     blend_words: tuple[Sequence[int | str], Sequence[int | str]] | None = None,
                     blend_threshold: float = 0.3, blend_start: float = 0.2,
                     max_len: int = MAX_LEN) -> AttentionControl:
    """A controller from prompts. mode: "replace" (word swap), "refine" (added words) or "reweight"
    (the edit prompts equal the source; only ``reweight`` changes). ``reweight`` {word of the edit
    prompt: factor} applies on top of any mode. ``blend_words`` = (source words, edit words) turns on
    local blending (the same edit words for every edit prompt). ``cross_replace_steps`` may be a dict as
    in the reference code, {"default_": 0.8, "dog": 0.4, "hat": (0.2, 0.6)}: words of the edit prompts
    with their own cross-attention window (the others use "default_", 0.8 when absent)."""
    edits = list(edits)
    if not edits:
        raise ValueError("give at least one edit prompt")
    kw = {}
    if isinstance(cross_replace_steps, dict):
        words = dict(cross_replace_steps)
        cross_replace_steps = words.pop("default_", 0.8)
        found = {w: False for w in words}
        windows = []
        for e in edits:
            ww = {}
            for w, win in words.items():
                try:
                    pos = e.positions(w)
                except ValueError:
                    continue
                found[w] = True
                ww.update({p: win for p in pos})
            windows.append(ww)
        missing = [w for w, hit in found.items() if not hit]
        if missing:
            raise ValueError(f"cross-attention windows for {missing}: not words of the edit prompt "
                             f"{' '.join(edits[0].words)!r}; name words of the edit prompt")
        kw["word_windows"] = windows
    if mode == "replace":
        kw["mapper"] = torch.stack([replace_mapper(source, e, max_len) for e in edits])
    elif mode == "refine":
        maps = [refine_mapper(source, e, max_len) for e in edits]
        kw["refine"] = (torch.stack([m[0] for m in maps]), torch.stack([m[1] for m in maps]))
    elif mode == "reweight":
        for e in edits:
            if e.tokens != source.tokens:
                raise ValueError("reweight keeps the source prompt: the edit prompt must equal it "
                                 "(use replace or refine with reweight=… to change words too)")
    else:
        raise ValueError(f"mode {mode!r} unknown: use 'replace', 'refine' or 'reweight'")
    if reweight:
        kw["scale"] = torch.stack([token_scale(e, reweight, max_len) for e in edits])
    lb = None
    if blend_words is not None:
        src_words, edit_words = blend_words
        rows = [sorted({p for w in src_words for p in source.positions(w)})]
        rows += [sorted({p for w in edit_words for p in e.positions(w)}) for e in edits]
        lb = LocalBlend(rows, blend_threshold, blend_start)
    return AttentionControl(len(edits), cross_replace_steps=cross_replace_steps,
                            self_replace_steps=self_replace_steps, self_max_tokens=self_max_tokens,
                            local_blend=lb, **kw)


# --------------------------------------------------------------------------------------------- hooks
def controlled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, controller,
                         is_cross: bool, place: str = "", cond_or_uncond: list[int] | None = None) -> torch.Tensor:
    """Multi-head attention with explicit probabilities handed to ``controller``.
    q [B, Nq, H·D], k/v [B, Nk, H·D] → [B, Nq, H·D]. Layers the controller does not want now
    (``controller.wants``) take the fused kernel."""
    b, n_q, inner = q.shape
    d = inner // heads
    qh, kh, vh = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    wants = getattr(controller, "wants", None)
    if wants is not None and not wants(is_cross, n_q):
        out = F.scaled_dot_product_attention(qh, kh, vh)
    else:
        probs = (qh.float() @ kh.float().transpose(-1, -2) * d ** -0.5).softmax(-1)
        if cond_or_uncond is not None:
            probs = controller(probs, is_cross, place, cond_or_uncond=cond_or_uncond)
        else:
            probs = controller(probs, is_cross, place)
        out = probs.to(vh.dtype) @ vh
    return out.transpose(1, 2).reshape(b, n_q, inner)


class _Hooks:
    """Undo handle of ``apply_attention_control`` (also a context manager)."""

    def __init__(self, modules):
        self.modules = modules

    def remove(self):
        for m in self.modules:
            m.__dict__.pop("forward", None)
        self.modules = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def apply_attention_control(module: torch.nn.Module, controller) -> _Hooks:
    """Route every LDM-style attention sub-module of ``module`` (attributes to_q, to_k, to_v, to_out,
    heads; forward(x, context=None, ...)) through ``controller``: is_cross = a context was given,
    place = the sub-module's name. Returns a handle; ``.remove()`` (or ``with``) restores them."""
    patched = []
    for name, m in module.named_modules():
        if not all(hasattr(m, a) for a in ("to_q", "to_k", "to_v", "to_out", "heads")):
            continue

        def forward(self, x, context=None, mask=None, _name=name, **kwargs):
            if mask is not None or kwargs.get("value") is not None:
                raise ValueError("attention masks and separate values are not supported under "
                                 "prompt-to-prompt control")
            is_cross = context is not None
            ctx = x if context is None else context
            out = controlled_attention(self.to_q(x), self.to_k(ctx), self.to_v(ctx), self.heads,
                                       controller, is_cross, _name)
            return self.to_out(out)

        m.forward = types.MethodType(forward, m)
        patched.append(m)
    if not patched:
        raise ValueError(f"no attention modules (to_q/to_k/to_v/to_out/heads) in {type(module).__name__}")
    return _Hooks(patched)


def attention_patch(controller, is_cross: bool):
    """A ComfyUI ``patches_replace`` function for "attn1" (is_cross=False) or "attn2" (True):
    ``patch(q, k, v, extra_options) -> out``, q/k/v already projected [B, N, heads·dim_head];
    reads extra_options["n_heads"], ["cond_or_uncond"], ["block"]."""
    def patch(q, k, v, extra_options):
        block = extra_options.get("block")
        place = "" if block is None else f"{block[0]}_{block[1]}"
        return controlled_attention(q, k, v, extra_options["n_heads"], controller, is_cross, place,
                                    extra_options.get("cond_or_uncond"))
    return patch


def comfy_block_keys(max_index: int = 12) -> list[tuple[str, int]]:
    """Keys for ``ModelPatcher.set_model_attn1_replace/attn2_replace(patch, name, number)``: every
    ("input", n), ("middle", 0), ("output", n) (keys without a transformer block are never looked up)."""
    return [("input", n) for n in range(max_index)] + [("middle", 0)] + \
           [("output", n) for n in range(max_index)]

"""How tokens and numbers are shown: token text for charts (HTML) and for sentences (Markdown),
percentages and short numbers, and the token bins that keep long prompts readable.

Token text is untrusted: ``display_token`` HTML-escapes it for chart labels, ``code_token`` puts
it in a Markdown code span (backticks replaced) so it cannot inject Markdown, HTML or LaTeX.
"""

from __future__ import annotations

import html
import math

import torch

BIN_THRESHOLD = 512  # tokens above which token axes are aggregated into bins
MAX_BINS = 256


def visible(token: str) -> str:
    """A token with its whitespace made visible (for tables): '␣', '↵', '⇥'."""
    return _visible(token)


def _visible(token: str) -> str:
    return token.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥").replace("\r", "")


def display_token(token: str) -> str:
    """A token as visible, HTML-escaped text: spaces as '␣', newlines as '↵', tabs as '⇥'."""
    # quote=False: plotly's SVG text decodes &amp; &lt; &gt; but shows &quot; literally
    return html.escape(_visible(token) or "∅", quote=False)


def code_token(token: str) -> str:
    """A token as an inline Markdown code span with visible whitespace."""
    return f"`{_visible(token.replace('`', 'ˋ')) or '∅'}`"


def pct(x: float) -> str:
    """A share as a percentage that keeps its meaning: whole percents when exact to 0.05
    (50%), else one decimal (12.5%), two significant digits below 1% (0.31%)."""
    if math.isnan(x):
        return "n/a"
    v = 100 * x
    if abs(v - round(v)) < 0.05:
        return f"{round(v):.0f}%"
    return f"{v:.2g}%" if abs(v) < 1 else f"{v:.1f}%"


def times(x: float) -> str:
    """A ratio such as '2.5×' or '10.7×': three significant digits at most, no misleading rounding."""
    return f"{x:.3g}×" if x < 100 else f"{x:.0f}×"


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 token', '2 tokens' ('1 assignment', '3 assignments'; ``many`` for irregular plurals)."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def num(x: float) -> str:
    """Three decimals, or three significant digits for small values."""
    return f"{x:.3f}" if x == 0 or abs(x) >= 0.01 else f"{x:.2g}"


def token_bins(num_tokens: int) -> int:
    """Tokens per bin on token axes: 1 up to ``BIN_THRESHOLD`` tokens, else enough for ``MAX_BINS``."""
    return 1 if num_tokens <= BIN_THRESHOLD else math.ceil(num_tokens / MAX_BINS)


def bin_note(size: int, num_tokens: int) -> str:
    """The title suffix that says a token axis is binned ('' when it is not)."""
    return "" if size == 1 else f" — {num_tokens} tokens aggregated into {math.ceil(num_tokens / size)} bins of {size}"


def bin_mean(x: torch.Tensor, size: int) -> torch.Tensor:
    """Mean over consecutive groups of ``size`` rows of (T, ...) -> (ceil(T/size), ...)."""
    if size == 1:
        return x
    T = x.shape[0]
    n = math.ceil(T / size)
    pad = n * size - T
    xs = torch.cat([x.double(), torch.zeros((pad, *x.shape[1:]), dtype=torch.float64)])
    sums = xs.reshape(n, size, *x.shape[1:]).sum(dim=1)
    counts = torch.full((n,), float(size), dtype=torch.float64)
    counts[-1] = size - pad
    return sums / counts.reshape(n, *([1] * (x.dim() - 1)))


def bin_sum(x: torch.Tensor, size: int) -> torch.Tensor:
    """Sum over consecutive groups of ``size`` rows of (T, ...) -> (ceil(T/size), ...)."""
    if size == 1:
        return x
    T = x.shape[0]
    n = math.ceil(T / size)
    xs = torch.cat([x, torch.zeros((n * size - T, *x.shape[1:]), dtype=x.dtype)])
    return xs.reshape(n, size, *x.shape[1:]).sum(dim=1)


LIST_LAYERS = 8  # per-layer numbers are listed up to this many layers, summarised above


def per_layer_counts(layers: list[int], counts: list[int], noun: str) -> str:
    """Per-layer counts in a phrase that stays short at 94 layers: 'dropped per layer 0, 3, 1, 0'
    up to LIST_LAYERS layers; '0 dropped in all 48 layers'; 'dropped in 3 of 61 layers: 12, 40, 41'."""
    if len(layers) <= LIST_LAYERS:
        return f"{noun} per layer " + ", ".join(map(str, counts))
    hit = [layer for layer, n in zip(layers, counts, strict=True) if n]
    if not hit:
        return f"0 {noun} in all {len(layers)} layers"
    named = ", ".join(map(str, hit[:LIST_LAYERS])) + (" …" if len(hit) > LIST_LAYERS else "")
    return f"{sum(counts)} {noun} in {len(hit)} of {len(layers)} layers: {named}"


def per_layer_values(layers: list[int], values: list[float], fmt=str) -> str:  # noqa: ANN001 - a formatter
    """'layer 0: 4, layer 1: 5' up to LIST_LAYERS layers; else the range over layers and where."""
    if len(layers) <= LIST_LAYERS:
        return ", ".join(f"layer {layer}: {fmt(v)}" for layer, v in zip(layers, values, strict=True))
    low, high = min(range(len(values)), key=values.__getitem__), max(range(len(values)), key=values.__getitem__)
    return (
        f"from {fmt(values[low])} (layer {layers[low]}) to {fmt(values[high])} (layer {layers[high]}) over "
        f"{len(layers)} layers"
    )

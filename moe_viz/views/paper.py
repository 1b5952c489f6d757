"""Paper mode: the routing figures people cite, regenerated on the user's model and corpus.

Each view names the paper and the section it follows, states the definition it computes (and
where moe-viz's reading differs from the paper's text or script), then cites the live numbers:

* Mixtral (Jiang et al., 2024, *Mixtral of Experts*, Sec. 5 "Routing analysis"): text coloured by
  first-choice expert in the first, middle and last MoE layers (Fig. 8); each expert's share of
  the assignments per domain (Fig. 7); repeated assignments of consecutive tokens (Table 5).
* OLMoE (Muennighoff et al., 2024, *OLMoE: Open Mixture-of-Experts Language Models*, Sec. 5 "MoE
  analysis"): expert co-activation, domain specialisation and vocabulary specialisation.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..corpus.report import CorpusReport
from ..trace import Trace
from ._display import pct
from ._plotly import finish
from ._view import View
from .corpus import (
    NO_DATA,
    _layer_index,
    best_index,
    ci_text,
    coactivation_heatmap,
    domain_expert_bars,
    domain_shares,
    intervals_note,
    reuse_table,
    vocabulary_specialisation,
)
from .routing import coloured_text

MIXTRAL = "Jiang et al., *Mixtral of Experts* (2024), Sec. 5 “Routing analysis”"
OLMOE = "Muennighoff et al., *OLMoE: Open Mixture-of-Experts Language Models* (2024), Sec. 5 “MoE analysis”"


def first_middle_last(layers: tuple[int, ...] | list[int]) -> list[int]:
    """The first, middle and last MoE layers (as Mixtral's layers 0, 15, 31), without repeats."""
    layers = list(layers)
    return list(dict.fromkeys([layers[0], layers[len(layers) // 2], layers[-1]]))


def _framed(view: View, name: str, source: str, definition: str) -> View:
    text = f"**Follows** {source}. **Definition:** {definition}\n\n{view.explanation}"
    return replace(view, name=name, explanation=text)


def mixtral_coloured_text(trace: Trace) -> list[View]:
    """Fig. 8: one document coloured by first-choice expert in the first, middle and last MoE layers."""
    views = []
    for layer in first_middle_last(trace.layer_ids):
        view = coloured_text(trace, layer)
        views.append(
            _framed(
                replace(view, title=f"Mixtral Fig. 8: text coloured by first choice, layer {layer}"),
                f"paper_mixtral_text_{layer}",
                f"{MIXTRAL}, Fig. 8",
                "each token's background is the colour of its first-choice expert (the highest-scoring expert it "
                "is sent to). Mixtral shows that neighbouring tokens, and tokens of the same syntax (indentation, "
                "keywords), often share an expert, more in the later layers.",
            )
        )
    return views


def mixtral_domain_bars(report: CorpusReport) -> list[View]:
    """Fig. 7: the share of each domain's assignments per expert, first / middle / last MoE layer."""
    out = []
    for layer in first_middle_last(report.domain.layers):
        view = domain_shares(report, layer)
        out.append(
            _framed(
                replace(view, title=f"Mixtral Fig. 7: expert share per domain, layer {layer}"),
                f"paper_mixtral_domains_{layer}",
                f"{MIXTRAL}, Fig. 7",
                "the proportion of a domain's expert assignments (first and second choices together, i.e. all k) "
                "that go to each expert. Mixtral found no clear topic experts on The Pile, with the same experts "
                "serving text, mathematics and code — 'experts follow syntax, not topic'. Your corpus and model "
                "may differ.",
            )
        )
    return out


def mixtral_reuse_table(report: CorpusReport) -> View:
    """Table 5: repeated assignments of consecutive tokens per domain, first / middle / last layer."""
    keep = first_middle_last(report.reuse.layers)
    view = reuse_table(report, by_domain=True, layers=keep)
    k = report.meta["top_k"]
    E = int(report.meta["num_experts"])
    r = report.reuse
    li = list(r.layers).index(keep[-1])
    definition = (
        "'First choice': the share of consecutive token pairs whose first-choice experts are the same (random "
        f"routing: {pct(float(r.baselines[li, 0]))}). 'First or second choice' (here 'sets share an expert'): the "
        "share of pairs whose expert sets share at least one expert (random top-"
        f"{k[li]} of {E}: {pct(float(r.baselines[li, 1]))}); Mixtral's table words this column loosely, and this "
        "is the reading in moe-viz's metric notes. Pairs never cross a chunk boundary."
    )
    framed = _framed(view, "paper_mixtral_reuse", f"{MIXTRAL}, Table 5", definition)
    return replace(framed, title="Mixtral Table 5: repeated assignments of consecutive tokens")


def olmoe_order(matrix: np.ndarray, n: int) -> list[int]:
    """Experts in the order OLMoE's heatmap uses: walk pairs from the strongest co-activation down,
    adding each new expert, until ``n`` experts are listed (then any unused ones)."""
    m = np.nan_to_num(matrix, nan=-1.0)
    order: list[int] = []
    for flat in np.argsort(-m, axis=None, kind="stable"):
        for e in np.unravel_index(flat, m.shape):
            if int(e) not in order:
                order.append(int(e))
        if len(order) >= n:
            break
    return order[:n]


def olmoe_coactivation(report: CorpusReport, layer: int, n: int = 16) -> View:
    """Expert co-activation heatmap, OLMoE style: the adjacent-rank variant of its analysis script,
    the ``n`` experts of the strongest pairs."""
    li = _layer_index(report, layer)
    E = report.coactivation.matrix.value.shape[-1]
    order = olmoe_order(report.coactivation_adjacent.matrix.value[li], min(n, E))
    view = coactivation_heatmap(report, layer, adjacent=True, order=order)
    definition = (
        "for experts a and b, the number of tokens where b is routed next to a in the token's top-k list, divided "
        "by the number of tokens routed to a (OLMoE's routing-analysis script counts neighbouring entries of the "
        "score-sorted top-k; moe-viz's Load-balance and Corpus pages also show the all-pairs version). Experts are "
        f"ordered as in the paper's figure: from the strongest pairs down, {len(order)} of {E}. OLMoE finds little "
        "co-activation: experts rarely team up."
        + (
            " With k = 2 the two experts of a token are always neighbours, so this equals the all-pairs co-activation."
            if int(report.meta["top_k"][li]) == 2
            else ""
        )
    )
    framed = _framed(view, f"paper_olmoe_coactivation_{layer}", f"{OLMOE}, expert co-activation", definition)
    return replace(framed, title=f"OLMoE: expert co-activation (adjacent ranks), layer {layer}")


def olmoe_domain_specialisation(report: CorpusReport, layer: int) -> View:
    """OLMoE's domain specialisation: per expert, the share of a domain's tokens routed to it (top-k),
    against the uniform k/E."""
    li = _layer_index(report, layer)
    d = report.domain
    rate = d.token_rate
    E = rate.value.shape[-1]
    k = int(report.meta["top_k"][li])
    fig = domain_expert_bars(
        rate,
        li,
        d.domains,
        (k / E, f"uniform k/E = {pct(k / E)}"),
        f"OLMoE domain specialisation, layer {layer}: share of each domain's tokens routed to the expert",
        "tokens routed to the expert (top-k)",
        "of its tokens",
    )
    top = best_index(rate.value[li])
    if top is None:
        return View(
            f"paper_olmoe_domains_{layer}", f"OLMoE: domain specialisation, layer {layer}", NO_DATA, figure=finish(fig)
        )
    j, e = top
    text = (
        f"**Follows** {OLMOE}, domain specialisation. **Definition:** for expert e and domain D, the number of "
        f"D's tokens whose top-{k} includes e, divided by D's tokens (the bars of one domain add up to k = {k}); "
        f"uniform routing gives k/E = {pct(k / E)}. With exactly k experts per token this is k times Mixtral's share "
        "above, on OLMoE's scale. OLMoE finds strong specialisation for specialised domains "
        f"(arXiv, GitHub), weak for general web text.\n\nHere the most specialised pair is **{d.domains[j]} → expert "
        f"{e}**: {ci_text(*rate.at(li, j, e), pct)} of its tokens, against {pct(k / E)}. " + intervals_note(report)
    )
    return View(
        f"paper_olmoe_domains_{layer}", f"OLMoE: domain specialisation, layer {layer}", text, figure=finish(fig)
    )


def olmoe_vocabulary(report: CorpusReport) -> View:
    view = vocabulary_specialisation(report)
    definition = (
        "for a token id, the share of its occurrences whose first-choice (top-1) expert is the id's most frequent "
        "expert; OLMoE computes it for the input token, the true next token and the predicted next token, and "
        "finds later layers specialise on what comes next (predicted tokens) more than on the input."
    )
    framed = _framed(view, "paper_olmoe_vocabulary", f"{OLMOE}, vocabulary specialisation", definition)
    return replace(framed, title="OLMoE: vocabulary specialisation per layer")


def paper_views(report: CorpusReport, sample: Trace | None = None) -> list[View]:
    """The Paper page, top to bottom: Mixtral's figures, then OLMoE's (the coloured text needs a
    traced sample document)."""
    mid = first_middle_last(report.domain.layers)
    views = [*(mixtral_coloured_text(sample) if sample is not None else [])]
    views += mixtral_domain_bars(report)
    views.append(mixtral_reuse_table(report))
    views.append(olmoe_coactivation(report, mid[len(mid) // 2]))
    views.append(olmoe_domain_specialisation(report, mid[-1]))
    views.append(olmoe_vocabulary(report))
    return views

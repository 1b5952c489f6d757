"""moe-viz: see how a Mixture-of-Experts language model routes tokens.

Load a model, run a prompt under a routing policy, get a trace::

    from moe_viz import load_model, run_prompt, TopK, Capacity, Ensemble
    model = load_model()                      # the default model shipped in assets/
    trace = run_prompt(model, "def add(a, b):", Capacity(1.0))
    trace.layer(0).dropped_count

Modules: ``policies`` (the routing-policy protocol and the built-in policies), ``trace`` (the
data of a run), ``trace_io`` (its file formats), ``metrics`` (balance and comparison
statistics), ``views`` (figure + explanation per chart; needs plotly), ``corpus`` (corpus runs
with intervals; ``corpus.distributed`` on Ray), ``engines`` (routing imported from vLLM, SGLang,
Megatron-LM and llama.cpp), ``serving`` (request limits and a fair compute gate). Modules starting with ``_`` are implementation.
"""

from ._hooks import TimeBudgetExceeded
from ._routers import RouterSite, RouterSpec
from ._runs import Generation, Recording, Sampling, generate, record, run_batch, run_prompt
from .interventions import Ablate, Force
from .models import DEFAULT_MODEL, MoEModel, default_model_path, load_model, wrap_model
from .policies import (
    Capacity,
    Ensemble,
    Policy,
    RouterCall,
    RoutingDecision,
    TopK,
    parse_policy,
    policy_spec,
    register_policy,
    route,
)
from .serving import Busy, ComputeGate, Limits
from .trace import LayerTrace, OutputTrace, Trace

__all__ = [
    "Ablate",
    "Busy",
    "Capacity",
    "ComputeGate",
    "DEFAULT_MODEL",
    "Ensemble",
    "Force",
    "Generation",
    "LayerTrace",
    "Limits",
    "MoEModel",
    "OutputTrace",
    "Policy",
    "Recording",
    "RouterCall",
    "RouterSite",
    "RouterSpec",
    "RoutingDecision",
    "Sampling",
    "TimeBudgetExceeded",
    "TopK",
    "Trace",
    "default_model_path",
    "generate",
    "load_model",
    "parse_policy",
    "policy_spec",
    "record",
    "register_policy",
    "route",
    "run_batch",
    "run_prompt",
    "wrap_model",
]

"""moe-viz: see how a Mixture-of-Experts language model routes tokens.

Load a model, run a prompt under a routing policy, get a trace::

    from moe_viz import load_model, run_prompt, TopK, Capacity, Ensemble
    model = load_model()                      # the default model shipped in assets/
    trace = run_prompt(model, "def add(a, b):", Capacity(1.0))
    trace.layer(0).dropped_count
"""

from .adapters import RouterSite, RouterSpec
from .models import DEFAULT_MODEL, MoEModel, load_model, wrap_model
from .patching import TimeBudgetExceeded, routing
from .policies import Capacity, Ensemble, Policy, TopK, parse_policy, policy_spec
from .routing import Routing, route
from .serving import Busy, ComputeGate, Limits
from .runner import Generation, Sampling, generate, run_prompt
from .trace import LayerTrace, OutputTrace, Trace

__all__ = [
    "Busy",
    "Capacity",
    "ComputeGate",
    "DEFAULT_MODEL",
    "Ensemble",
    "Generation",
    "LayerTrace",
    "Limits",
    "MoEModel",
    "OutputTrace",
    "Policy",
    "RouterSite",
    "RouterSpec",
    "Routing",
    "Sampling",
    "TimeBudgetExceeded",
    "TopK",
    "Trace",
    "generate",
    "load_model",
    "parse_policy",
    "policy_spec",
    "route",
    "routing",
    "run_prompt",
    "wrap_model",
]

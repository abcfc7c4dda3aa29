"""safequant probes: activation capture and linear probes of the safety representation: where in the network harmful and benign requests are told apart."""

from .capture import Activations, capture, parse_layers
from .errors import ProbeError
from .projection import project_2d
from .separability import drift, fisher_ratio, projection_stats, separability
from .slr import SLRProbe, fit_slr, load_probes, save_probes, stratified_split
from .suite import ProbeSettings, ProbeSuite, run_probe_suite
from .transfer import transfer, transfer_layers

__all__ = [
    "Activations", "ProbeError", "ProbeSettings", "ProbeSuite", "SLRProbe", "capture", "drift", "fisher_ratio",
    "fit_slr", "load_probes", "parse_layers", "project_2d", "projection_stats", "run_probe_suite", "save_probes",
    "separability", "stratified_split", "transfer", "transfer_layers",
]

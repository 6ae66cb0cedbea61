"""adtr-edge: streaming visual inspection for factory edge boxes.

One distribution namespace for the project's packages, so an installed agent never collides with another
package called `model` or `agent` (or a `model/` folder in a Ray job's working directory):

    adtr_edge.model      the ADTR network, its scoring and training (plain PyTorch)
    adtr_edge.lifecycle  registry, sample store, gate, drift: the model's life on the line (no Ray, no ZeroMQ)
    adtr_edge.actors     the Ray actors and the leaf wire contract (actors.contract)
    adtr_edge.agent      the CLI, the HTTP API, the console, the demos

In the repository the four live as top-level folders (the design card's layout); `adtr_edge/` holds links to
them, so a checkout, an editable install and the built wheel (which carries real copies) import the same names.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("adtr-edge")
except PackageNotFoundError:  # a bare checkout, not installed
    __version__ = "unknown"

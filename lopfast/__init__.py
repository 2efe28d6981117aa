"""lopfast: linear over-parameterization that helps pruned networks recover accuracy.

Prune a network, expand every compact conv into an exactly equivalent 1x1 -> kxk -> 1x1
chain, fine-tune it with similarity-preserving distillation from the unpruned teacher, and
contract it back into the plain compact model.
"""
__version__ = "0.1.0"

from lopfast.backend import get_backend, use_backend
from lopfast.layers import ExpandedConv2d, ExpandedLinear
from lopfast.surgery import contract, expand, expanded_modules, set_mode

__all__ = [
    "ExpandedConv2d",
    "ExpandedLinear",
    "contract",
    "expand",
    "expanded_modules",
    "get_backend",
    "set_mode",
    "use_backend",
]

# Further public API is added below by the modules that provide it (one block per feature).

# Fused collapse (issue 5): grouped collapse op and the model-level fast path.
from lopfast.fastpath import CollapsedForward  # noqa: E402
from lopfast.ops.collapse import collapse_many  # noqa: E402

__all__ += ["CollapsedForward", "collapse_many"]

# Structured pruning and pickle-free save/load (issue 4). lopfast.prune is the subpackage,
# callable as lopfast.prune(model, example_inputs, ...).
from lopfast import prune  # noqa: E402
from lopfast.io import ModelFileError, load, register_architecture, save  # noqa: E402
from lopfast.prune import PruneReport  # noqa: E402

__all__ += ["ModelFileError", "PruneReport", "load", "prune", "register_architecture", "save"]

# Prune -> expand -> distill -> contract pipeline, model zoo and data (issue 6); the `lopfast`
# command line lives in lopfast.cli. Importing it also registers the zoo with lopfast.io.
from lopfast.pipeline import RunConfig, build_model, load_data, run_pipeline  # noqa: E402

__all__ += ["RunConfig", "build_model", "load_data", "run_pipeline"]

# Similarity-preserving distillation (issue 3): fused Triton SP loss, feature taps, layer pairs.
from lopfast.distill import FeatureTaps, SPDistiller, SPLoss, sp_pairs  # noqa: E402
from lopfast.ops.sp_loss import sp_gram, sp_loss, sp_loss_from_gram  # noqa: E402

__all__ += ["FeatureTaps", "SPDistiller", "SPLoss", "sp_gram", "sp_loss", "sp_loss_from_gram", "sp_pairs"]

# GPU-proofing (issue 9): lopfast.selfcheck() checks every backend of every op against float64.
from lopfast.selfcheck import selfcheck  # noqa: E402

__all__ += ["selfcheck"]

# Quantization-aware LOP: QAT layers, fusers, eager mapping and FX configs for expanded models.
from lopfast.layers import qat  # noqa: E402

__all__ += ["qat"]

"""Over-parameterized layers and the decomposition maths behind them."""
from lopfast.layers.conv import ExpandedConv2d
from lopfast.layers.decompose import collapse, collapse_linear, decompose, decompose_linear
from lopfast.layers.linear import ExpandedLinear
from lopfast.layers import qat  # noqa: E402  (registers the fuser methods of expanded layers with torch.ao)

__all__ = ["ExpandedConv2d", "ExpandedLinear", "collapse", "collapse_linear", "decompose", "decompose_linear", "qat"]

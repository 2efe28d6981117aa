"""Over-parameterized layers and the decomposition maths behind them."""
from lopfast.layers.conv import ExpandedConv2d
from lopfast.layers.decompose import collapse, collapse_linear, decompose, decompose_linear
from lopfast.layers.linear import ExpandedLinear

__all__ = ["ExpandedConv2d", "ExpandedLinear", "collapse", "collapse_linear", "decompose", "decompose_linear"]

"""The PyTorch round trip under the name issue 14 gives it: `condense_graph.torch.reduce_module`
(the `torch` extra). The implementation is `condense_graph.torch_module`."""

from condense_graph.torch_module import ReducedModule, reduce_module

__all__ = ["ReducedModule", "reduce_module"]

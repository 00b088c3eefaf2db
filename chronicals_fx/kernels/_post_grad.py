"""What our Inductor post-grad passes share: chaining with a pass configured before them, the
cache key, and installing into Inductor's options."""

from __future__ import annotations

import inspect

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass


class ChainedPostGradPass(CustomGraphPass):
    """A pass of ours for Inductor's ``post_grad_custom_post_pass``: :meth:`run` on the graph,
    then the pass that was configured there before it (``then``), if any."""

    def __init__(self, then=None) -> None:
        self.then = then

    def run(self, graph: torch.fx.Graph) -> None:
        raise NotImplementedError

    def cache_key(self) -> tuple:
        """What the pass's decisions depend on beyond its code and the graph."""
        return ()

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.run(graph)
        if self.then is not None:
            self.then(graph)

    def uuid(self):
        from torch._inductor.custom_graph_pass import get_hash_for_files

        then = None
        if self.then is not None:
            then = self.then.uuid() if isinstance(self.then, CustomGraphPass) else None
            if then is None:
                return None      # a pass Inductor can't key: it then bypasses its cache
        from . import _triton    # launch_of, which the passes use to find their launches

        code = (inspect.getfile(type(self)), __file__, _triton.__file__)
        return (get_hash_for_files(code), *self.cache_key(), then)

    @classmethod
    def installed_in(cls, options: dict) -> dict:
        """``options`` (Inductor config) with this pass installed, chained before a post-grad
        pass already there; unchanged if it is in the chain already."""
        current = options.get("post_grad_custom_post_pass")
        link = current
        while isinstance(link, ChainedPostGradPass):
            if isinstance(link, cls):
                return options
            link = link.then
        return {**options, "post_grad_custom_post_pass": cls(then=current)}

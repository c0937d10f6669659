"""A split-K sum done inside a kernel (the last program of each tile adds the slices in slice order) must give
bit-identical results on every call, and, on a GPU, on every CUDA-graph replay (its tile counters are zeroed by
each launch, graph replays included)."""

import torch


def assert_same_bits_across_calls_and_graph_replays(fn, x: torch.Tensor, reps: int = 3) -> torch.Tensor:
    """fn(x) -> tensor. Checks repeated eager calls, then (CUDA) graph replays of one captured call, and a replay
    after new values were copied into x against an eager call on them. Returns the first result."""
    first = fn(x)
    for _ in range(reps):
        assert torch.equal(fn(x), first)
    if x.device.type != "cuda":
        return first
    side = torch.cuda.Stream()  # warm-up on a side stream before capture, as torch.cuda.graphs recommends
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(x)
    for _ in range(reps):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, first)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fn(x))
    return first

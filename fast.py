"""The fast paths of a denoiser: torch.compile with its adapters attached, CUDA graphs, channels_last.

    fast.speed_up(base.model, compile=True)          # in place: every later call of base.model is compiled
    student = adapters.attach(base.model, ...)       # before or after: dynamo sees hooks added later too

sample.py and train_agd.py take them as flags of their own group (`add_arguments`); bench/gpu.py
measures what each buys on a GPU.

What compiling does to the adapters (torch._dynamo.explain on tiny DiTs and UNets, tests/test_fast.py):
their forward hooks are traced into the model's graph, with no graph break, inside a scope or
outside it, with gradients and gradient checkpointing too. A scope changes what the hooks read
(`Attachment._condition`: None, or the condition's dict), and dynamo guards on that: one graph for
the base alone and one for the student, each compiled once. w, t and the class are inputs of the
graph, not constants: a new w reuses it. Dynamo guards on the grad mode too, so collecting (no
gradients) and training compile a graph each. The hooks' cost in a compiled step is the adapters'
own arithmetic plus guard checks on the CPU side (bench/gpu.py times it against the base).
"""

import torch

import unet

# -----------------------------------------------------------------------------
# flags


def add_arguments(parser):
    """The speed flags, as their own argument group of a CLI's parser."""
    g = parser.add_argument_group("speed (fast.py; for GPUs)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the denoiser with its adapters; the first call compiles (a minute or so "
                        "for SDXL on a GPU) and counts in the time printed")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="replay each step's kernels as a CUDA graph: torch.compile mode 'reduce-overhead' (implies "
                        "--compile); for static shapes, CUDA only (a note and no effect elsewhere)")
    g.add_argument("--channels-last", action="store_true",
                   help="UNet: weights and activations in channels-last (NHWC) layout, which GPUs' convolutions prefer")
    return g


def compile_options(device, cuda_graphs=False):
    """torch.compile's options for a model on `device`, and a note if CUDA graphs were asked for where none exist."""
    if not cuda_graphs:
        return {}, None
    if torch.device(device).type != "cuda":
        return {}, f"--cuda-graphs: CUDA graphs need a CUDA device, not {device}; ignored"
    # CUDA graphs (torch.compile's cudagraph trees) record a step's kernels once and replay them in one
    # launch: what a batch-1 step, short on arithmetic, loses to kernel launches comes back. A graph
    # replays fixed shapes and overwrites its outputs at the next replay: the samplers and training
    # consume each output before the next call (guidance.sample, trajectories' callback copies).
    return {"mode": "reduce-overhead"}, None


# -----------------------------------------------------------------------------
# applying them


def speed_up(model, compile=False, cuda_graphs=False, channels_last=False, log=print, backend="inductor"):
    """Apply the fast paths asked for to `model`, in place (its state dict keys stay); returns it.

    `backend` is torch.compile's ("aot_eager": dynamo and autograd's graphs without code generation,
    which the tests and dry runs use to check the tracing in seconds).
    """
    device = next(model.parameters()).device
    if channels_last:
        if isinstance(model, unet.UNet):
            # NHWC convolution weights: every activation after conv_in follows their layout, and the
            # SpatialTransformers' reshapes to tokens (B, H * W, C) become free views
            model.to(memory_format=torch.channels_last)
        else:
            log(f"--channels-last: for the UNet's convolutions; a {type(model).__name__} has none that "
                "matter, ignored")
    options, note = compile_options(device, cuda_graphs)
    if note:
        log(note)
    if compile or options:
        model.compile(backend=backend, **options)  # Module.compile: in place, unlike torch.compile(model)'s wrapper
    return model


def graph_breaks(fn, *args, **kwargs):
    """(graphs, graph breaks, their reasons) of dynamo's trace of fn(*args, **kwargs) (torch._dynamo.explain)."""
    import torch._dynamo

    e = torch._dynamo.explain(fn)(*args, **kwargs)
    return e.graph_count, e.graph_break_count, [str(b.reason) for b in e.break_reasons]

"""Graph breaks of every full-size denoiser with its default adapters under torch.compile: counted on a CPU.

    python bench/graph_breaks.py                  # DiT-XL/2, SD 2.1, SDXL: a few minutes on one core
    python bench/graph_breaks.py --models dit

torch._dynamo.explain traces the model as torch.compile would, on the meta device (shapes without
data: full size costs no memory): the base alone, the student in its scope, and a training call
(gradients, gradient checkpointing on). What it reports, graphs and graph breaks with their reasons,
depends on the code traced, not on the device that later runs the graph.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import adapters  # noqa: E402
import dit  # noqa: E402
import families  # noqa: E402
import fast  # noqa: E402
import random_models  # noqa: E402
import unet  # noqa: E402

SIDE = {"dit": 32, "sd21": 96, "sdxl": 128}  # latents: 256, 768 and 1024 px


def main(args):
    print("| model | call | graphs | graph breaks | seconds |\n| --- | --- | --- | --- | --- |")
    for name in args.models:
        with torch.device("meta"):
            model = dit.DiT(random_models.dit_config()) if name == "dit" else unet.UNet(random_models.unet_config(name))
            model = model.to(torch.bfloat16)
            student = adapters.attach(model, **random_models.adapter_options(name, model))
            base = families.Base(families.FAMILIES[name], "random", model, None, (4, SIDE[name], SIDE[name]), None, None)
            x, t, cond, _ = random_models.inputs(base, 1)
        calls = {"base": (False, None), "student": (False, 7.5), "student, training": (True, 7.5)}
        for call, (training, w) in calls.items():
            model.gradient_checkpointing = training
            start = time.perf_counter()
            with torch.set_grad_enabled(training):
                if w is None:
                    graphs, breaks, reasons = fast.graph_breaks(model, x, t, **cond)
                else:
                    with student.condition(w=torch.full((1,), w, device="meta"), t=t, **cond):
                        graphs, breaks, reasons = fast.graph_breaks(model, x, t, **cond)
            print(f"| {name} | {call} | {graphs} | {breaks} | {time.perf_counter() - start:.0f} |", flush=True)
            for reason in reasons:
                print(f"    {reason}")
            torch._dynamo.reset()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(SIDE), default=list(SIDE))
    main(parser.parse_args())

"""Lesson 8's calculator: sliders for the model, the GPUs and each axis, redrawing the planner's
memory and time breakdown of one layout with the same code as ``python -m minipar plan``
(``cost.predict`` for the numbers, ``report.plot_memory`` for the memory bars).

    from minipar.plan.calculator import calculator, draw
    draw(settings)      # one static figure (the documentation site shows this one)
    calculator()        # ipywidgets sliders that call draw on every change (in Jupyter)
"""
from minipar.errors import ConfigError
from minipar.plan.cost import mfu, predict
from minipar.plan.hardware import named_machine
from minipar.plan.memory import Headroom
from minipar.plan.model import ModelSpec
from minipar.plan.report import plot_memory, seconds, size
from minipar.plan.strategy import Strategy, check_strategy

DEFAULTS = dict(n_layer=96, n_embd=12288, n_head=96, n_kv_head=96, seq=2048, vocab=51200, swiglu=False, gpus=1024,
                gpu="a100", memory_gb=80, tp=8, pp=8, microbatches=48, schedule="1f1b", virtual=1, zero=1,
                sequence_parallel=True, recompute="selective", batch=1536, engine="minipar")


def layout(settings):
    """(model, strategy, machine) from the sliders' values; a ConfigError says what does not divide."""
    v = {**DEFAULTS, **settings}
    model = ModelSpec(v["n_layer"], v["n_embd"], v["n_head"], v["seq"], v["vocab"], "calculator",
                      ffn="swiglu" if v["swiglu"] else "gelu", n_kv_head=v["n_kv_head"])
    dp, rest = divmod(v["gpus"], v["tp"] * v["pp"])
    if rest or dp < 1:
        raise ConfigError(f"tp x pp = {v['tp'] * v['pp']} must divide the {v['gpus']} GPUs")
    strategy = Strategy(dp, v["tp"], v["pp"], v["batch"], v["microbatches"], v["schedule"], v["virtual"], v["zero"],
                        v["sequence_parallel"] and v["tp"] > 1, "" if v["recompute"] == "none" else v["recompute"],
                        "mixed", engine=v["engine"])
    problem = check_strategy(model, strategy)
    if problem:
        raise problem
    return model, strategy, named_machine(v["gpu"], v["gpus"], 8, v["memory_gb"])


def draw(settings, figure=None):
    """Memory per rank by component (left) and the step's time by part (right); returns the text."""
    import matplotlib.pyplot as plt

    model, strategy, machine = layout(settings)
    prediction = predict(model, strategy, machine, overlap=True, headroom=Headroom.for_machine(machine))
    if figure is None:
        figure = plt.figure(figsize=(11, 4.2))
    figure.clf()
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1, 2]})
    plot_memory([prediction], machine, None, axes=left)
    parts = ("compute", "bubble", "tp", "pp", "dp", "optimizer")
    values = [prediction.time[part] for part in parts]
    right.barh(parts, values, color=["tab:blue", "tab:gray", "tab:orange", "tab:green", "tab:red", "tab:purple"])
    right.invert_yaxis()
    right.set_xlabel("seconds per step")
    right.set_title(f"step {seconds(prediction.step)}, MFU {mfu(model, prediction, machine):.0%}")
    figure.tight_layout()
    fits = "fits" if prediction.fits else "does NOT fit"
    return (f"{strategy.describe()}: {size(prediction.memory['total'])} on the fullest rank ({fits} in "
            f"{size(machine.memory_bytes)}), {seconds(prediction.step)} per step, {model.parameters / 1e9:.3g} B "
            f"parameters")


def calculator():
    """The sliders (ipywidgets), each change redrawing ``draw``; returns the widget box."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import display

    d = DEFAULTS
    controls = {
        "n_layer": widgets.IntSlider(d["n_layer"], 2, 160, description="layers"),
        "n_embd": widgets.IntSlider(d["n_embd"], 512, 32768, step=512, description="hidden h"),
        "n_head": widgets.IntSlider(d["n_head"], 8, 256, step=8, description="heads"),
        "n_kv_head": widgets.IntSlider(d["n_kv_head"], 1, 256, description="KV heads"),
        "seq": widgets.IntSlider(d["seq"], 512, 32768, step=512, description="sequence"),
        "swiglu": widgets.Checkbox(d["swiglu"], description="SwiGLU"),
        "gpus": widgets.IntSlider(d["gpus"], 8, 4096, step=8, description="GPUs"),
        "gpu": widgets.Dropdown(options=["a100", "h100"], value=d["gpu"], description="GPU"),
        "tp": widgets.Dropdown(options=[1, 2, 4, 8], value=d["tp"], description="tp"),
        "pp": widgets.IntSlider(d["pp"], 1, 64, description="pp"),
        "microbatches": widgets.IntSlider(d["microbatches"], 1, 512, description="micro-batches"),
        "schedule": widgets.Dropdown(options=["gpipe", "1f1b", "interleaved", "zb-h1", "zb-h2"],
                                     value=d["schedule"], description="schedule"),
        "zero": widgets.Dropdown(options=[0, 1, 2, 3], value=d["zero"], description="ZeRO"),
        "sequence_parallel": widgets.Checkbox(d["sequence_parallel"], description="sequence parallel"),
        "recompute": widgets.Dropdown(options=["none", "selective", "full"], value=d["recompute"],
                                      description="recompute"),
        "batch": widgets.IntSlider(d["batch"], 8, 4096, step=8, description="global batch"),
        "engine": widgets.Dropdown(options=["minipar", "ideal"], value=d["engine"],
                                   description="engine"),
    }
    text, output = widgets.HTML(), widgets.Output()
    figure = None

    def redraw(**values):
        nonlocal figure
        with output:
            output.clear_output(wait=True)
            if figure is None:
                figure = plt.figure(figsize=(11, 4.2))
            try:
                text.value = draw(values, figure)
            except ConfigError as error:
                text.value = f"<b>not a layout:</b> {error}"
            display(figure)

    widgets.interactive_output(redraw, controls)
    box = widgets.VBox([widgets.HBox([widgets.VBox(list(controls.values())[:9]),
                                      widgets.VBox(list(controls.values())[9:])]), text, output])
    display(box)
    return box

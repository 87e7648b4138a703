"""The OpenVINO GenAI view of an openvino engine folder: the files that make the folder a model folder
that OpenVINO GenAI's `Text2ImagePipeline`, `Image2ImagePipeline` and `InpaintingPipeline` (C++,
Python, JS) load, beside sdrt's own, without a second copy of any weights.

    model_index.json                  pipeline class and components (diffusers' format)
    scheduler/scheduler_config.json   the folder's scheduler config, named as a class GenAI has
    tokenizer/openvino_tokenizer.xml  the tokenizer converted by openvino-tokenizers (+ detokenizer)
    <component>/config.json           the component's diffusers/transformers config
    <component>/openvino_model.xml    link to model.xml; the U-Net's is a copy of model.xml whose
                                      timestep input is int64 (GenAI feeds int64), converted to f32
    <component>/openvino_model.bin    link to model.bin

Written at build time; the links are recorded in the manifest and checked like the files. GenAI
computes in bf16 on CPUs with native bf16 whatever the IR holds, unless INFERENCE_PRECISION_HINT is
passed when the pipeline is created: the manifest records the value that gives sdrt's arithmetic.
"""

from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from sdrt.errors import SdrtError
from sdrt.manifest import file_sha256
from sdrt.model_info import ModelInfo, read_json
from sdrt.tasks import model_tasks

from .cache import BuildCache, cache_key

XML, BIN = "openvino_model.xml", "openvino_model.bin"
COMPONENTS = {"text_encoder": "text_encoder", "unet": "unet", "vae_decoder": "vae", "vae_encoder": "vae"}  # GenAI's -> the model's folder
# sdrt's name -> (diffusers class name, for the config; GenAI's Scheduler.Type member, to pick it in code) of the
# schedulers GenAI runs as sdrt does. Not LMS: GenAI 2026.4's LMS_DISCRETE type has DDIM's value (a config naming
# LMSDiscreteScheduler runs DDIM); not DPM++ 2M or TCD, which GenAI lacks.
SCHEDULERS = {"euler": ("EulerDiscreteScheduler", "EULER_DISCRETE"), "euler_a": ("EulerAncestralDiscreteScheduler", "EULER_ANCESTRAL_DISCRETE"),
              "ddim": ("DDIMScheduler", "DDIM"), "pndm": ("PNDMScheduler", "PNDM"), "lcm": ("LCMScheduler", "LCM")}
FALLBACK_SCHEDULER = "euler"


def genai_scheduler(scheduler: str, config: dict) -> str:
    """sdrt's name of the scheduler the GenAI view names: `scheduler` where GenAI runs it as sdrt does with
    `config`, else Euler. GenAI refuses, when it generates, what diffusers does by default for configs that do
    not say otherwise: DDIM's clipping (and thresholding), PNDM's Runge-Kutta warm-up steps."""
    if scheduler == "ddim" and (config.get("clip_sample", True) or config.get("thresholding", False)):
        return FALLBACK_SCHEDULER
    if scheduler == "pndm" and not config.get("skip_prk_steps", False):
        return FALLBACK_SCHEDULER
    return scheduler if scheduler in SCHEDULERS else FALLBACK_SCHEDULER


def genai_scheduler_object(folder: Path, scheduler: str):
    """OpenVINO GenAI's Scheduler running sdrt's `scheduler` (a key of SCHEDULERS) from the folder's scheduler config,
    for `pipe.set_scheduler`."""
    import openvino_genai

    kind = getattr(openvino_genai.Scheduler.Type, SCHEDULERS[scheduler][1])
    return openvino_genai.Scheduler.from_config(str(folder / "scheduler" / "scheduler_config.json"), kind)


def pipeline_class(info: ModelInfo) -> tuple[str | None, str]:
    """(model_index _class_name GenAI runs the model as, or None; why not)."""
    tasks = model_tasks(info)
    if "txt2img" in tasks:
        return ("LatentConsistencyModelPipeline" if info.guidance_embed_dim else "StableDiffusionPipeline"), ""
    if tasks == ("inpaint",):
        return "StableDiffusionInpaintPipeline", ""
    return None, f"OpenVINO GenAI has no {tasks[0]} pipeline"


def _finite(value: Any) -> Any:
    """JSON without the non-finite numbers diffusers writes (-Infinity), which GenAI's parser refuses:
    a key holding one is left out, so GenAI uses its default for it."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items() if not (isinstance(v, float) and not math.isfinite(v))}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(_finite(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")


def int64_timestep(xml: Path, out: Path) -> None:
    """A copy of an IR graph whose `timestep` Parameter takes int64, converted to float32 for its
    consumers. Only the graph text changes: the copy reads the same weights file."""
    tree = ET.parse(xml)
    layers, edges = tree.getroot().find("layers"), tree.getroot().find("edges")
    param = next((layer for layer in layers if layer.get("type") == "Parameter" and layer.get("name") == "timestep"), None)
    if param is None:
        raise SdrtError(f"{xml} has no timestep input; rebuild the engines with `sdrt build`")
    port = param.find("output/port")
    param.find("data").set("element_type", "i64")
    port.set("precision", "I64")
    pid, cid = param.get("id"), str(max(int(layer.get("id")) for layer in layers) + 1)
    convert = ET.SubElement(layers, "layer", {"id": cid, "name": "timestep/to_f32", "type": "Convert", "version": "opset1"})
    ET.SubElement(convert, "data", {"destination_type": "f32"})
    ports = (ET.SubElement(ET.SubElement(convert, "input"), "port", {"id": "0", "precision": "I64"}),
             ET.SubElement(ET.SubElement(convert, "output"), "port", {"id": "1", "precision": "FP32"}))
    for dim in port.findall("dim"):
        for p in ports:
            ET.SubElement(p, "dim").text = dim.text
    for edge in edges:
        if edge.get("from-layer") == pid:
            edge.set("from-layer", cid)
            edge.set("from-port", "1")
    ET.SubElement(edges, "edge", {"from-layer": pid, "from-port": "0", "to-layer": cid, "to-port": "0"})
    tree.write(out, encoding="utf-8", xml_declaration=True)


def _convert_tokenizer(model_dir: Path, out: Path, cache: BuildCache) -> None:
    """tokenizer/openvino_(de)tokenizer.xml + .bin, by openvino-tokenizers from the model's tokenizer files
    (cached by their content and the converter's versions: a conversion takes seconds)."""
    try:
        import openvino as ov
        import openvino_tokenizers
        import transformers
    except ImportError as exc:
        raise SdrtError(f"the OpenVINO GenAI files need {exc.name}: pip install 'sdrt[openvino,export]'") from None
    sources = sorted(p for p in (model_dir / "tokenizer").iterdir() if p.is_file())
    key = cache_key("genai-tokenizer", files={p.name: file_sha256(p) for p in sources},
                    versions=[ov.get_version(), openvino_tokenizers.__version__, transformers.__version__])
    if cache.fetch(key, out) is not None:
        return
    tokenizer, detokenizer = openvino_tokenizers.convert_tokenizer(transformers.AutoTokenizer.from_pretrained(model_dir / "tokenizer"),
                                                                   with_detokenizer=True)
    ov.save_model(tokenizer, str(out / "openvino_tokenizer.xml"))
    ov.save_model(detokenizer, str(out / "openvino_detokenizer.xml"))
    cache.store(key, [out / f"openvino_{kind}.{ext}" for kind in ("tokenizer", "detokenizer") for ext in ("xml", "bin")])


def write_view(folder: Path, model_dir: Path, info: ModelInfo, scheduler_config: dict, scheduler: str, compute: str,
               static: bool, cache: BuildCache, step_cache: bool = False) -> dict[str, Any]:
    """Write the view into `folder` (an engine folder being built from `model_dir`) -> manifest fields:
    {"links": {path: target}, "openvino_genai": {...}}; or only the reason GenAI cannot load it."""
    pipeline, why = pipeline_class(info)
    if static:
        pipeline, why = None, "static-shape engines: OpenVINO GenAI reshapes the models itself (build without --static-shape)"
    if step_cache:
        pipeline, why = None, ("built with --cache-branch: the U-Net has a second output (step caching's feature), which OpenVINO "
                               "GenAI's pipeline does not take; build without it for GenAI")
    if pipeline is None:
        return {"openvino_genai": {"loadable": False, "why": why}}
    same_as = genai_scheduler(scheduler, scheduler_config)
    _write_json(folder / "model_index.json", {
        "_class_name": pipeline,
        "scheduler": ["diffusers", SCHEDULERS[same_as][0]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
    _write_json(folder / "scheduler" / "scheduler_config.json", {**scheduler_config, "_class_name": SCHEDULERS[same_as][0]})
    links = {}
    for name, source in COMPONENTS.items():
        config = read_json(model_dir / source / "config.json")
        if source == "vae":
            config["scaling_factor"] = info.scaling_factor  # what sdrt divides by (a swapped VAE keeps the model's)
        _write_json(folder / name / "config.json", config)
        targets = {BIN: "model.bin"} if name == "unet" else {BIN: "model.bin", XML: "model.xml"}
        for link, target in targets.items():
            os.symlink(target, folder / name / link)
            links[f"{name}/{link}"] = f"{name}/{target}"
    int64_timestep(folder / "unet" / "model.xml", folder / "unet" / XML)
    _convert_tokenizer(model_dir, folder / "tokenizer", cache)
    return {"links": links, "openvino_genai": {
        "loadable": True,
        "pipeline": pipeline,
        "scheduler": SCHEDULERS[same_as][0],
        "sdrt_scheduler": same_as,  # `sdrt generate --scheduler` giving GenAI's default scheduler
        "properties": {"INFERENCE_PRECISION_HINT": compute},  # pass when creating the pipeline: sdrt's arithmetic
    }}

"""What `sdrt build` reads, made into a diffusers model folder: a single-file checkpoint converted
(`single_file.py`); LoRAs merged into the weights, textual-inversion embeddings added, the VAE
replaced, each by diffusers' own loaders. A plain diffusers folder with nothing to change is used as
it is. The record returned goes into the manifest: what was detected, what was merged."""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from sdrt.errors import SdrtError, first_line
from sdrt.tokenizer import ADDED_TOKENS, TOKENIZER_FILES

from . import single_file

TINY_DECODER_FOLDER = "vae_decoder"  # in a prepared model folder: the AutoencoderTiny that decodes (--vae-decoder)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceOptions:
    config: Path | None = None  # --config: a diffusers config folder or the original inference .yaml of a single-file checkpoint
    prediction_type: str | None = None  # --prediction-type
    ema: bool = False  # --ema: a checkpoint's EMA U-Net weights instead of its training weights
    loras: tuple[tuple[Path, float], ...] = field(default_factory=tuple)  # --lora FILE[:WEIGHT]
    embeddings: tuple[tuple[Path, str], ...] = field(default_factory=tuple)  # --embedding FILE[:TOKEN]
    vae: Path | None = None  # --vae FILE|DIR
    vae_decoder: Path | None = None  # --vae-decoder DIR: a diffusers AutoencoderTiny folder (TAESD) that decodes instead of the VAE

    def __post_init__(self):
        if self.prediction_type is not None and self.prediction_type not in single_file.PREDICTION_TYPES:
            raise SdrtError(f"--prediction-type {self.prediction_type!r}: accepted values are {', '.join(single_file.PREDICTION_TYPES)}")
        if self.config is not None and not (self.config / "model_index.json").is_file() and not (
                self.config.is_file() and self.config.suffix in (".yaml", ".yml")):
            raise SdrtError(f"--config {self.config}: neither a diffusers config folder (with model_index.json; weights not needed) nor "
                            "an original inference config (.yaml, e.g. v1-inference.yaml)")
        for option, files in (("--lora", self.loras), ("--embedding", self.embeddings)):
            for path, _ in files:
                if not path.is_file():
                    raise SdrtError(f"{option} {path}: no such file")
        if self.vae is not None and not self.vae.exists():
            raise SdrtError(f"--vae {self.vae}: no such file or folder")
        if self.vae_decoder is not None and not (self.vae_decoder / "config.json").is_file():
            raise SdrtError(f"--vae-decoder {self.vae_decoder}: not a diffusers AutoencoderTiny folder (config.json and weights), "
                            "e.g. madebyollin/taesd for SD 1.x/2.x")
        tokens = [token for _, token in self.embeddings]
        if len(set(tokens)) < len(tokens):
            raise SdrtError(f"--embedding: two embeddings would be called {max(tokens, key=tokens.count)!r}; name them with FILE:TOKEN")


def parse_lora(value: str) -> tuple[Path, float]:
    """--lora FILE[:WEIGHT] -> (file, weight); weight 1.0 when not given."""
    path, sep, weight = value.rpartition(":")
    if sep and path:
        try:
            return Path(path), float(weight)
        except ValueError:
            pass
    return Path(value), 1.0


def parse_embedding(value: str) -> tuple[Path, str]:
    """--embedding FILE[:TOKEN] -> (file, token); the token is the file's name without suffix when not given, as
    the WebUI names embeddings."""
    path, sep, token = value.rpartition(":")
    if sep and path and token and not Path(value).is_file():
        return Path(path), token
    return Path(value), Path(value).stem


def needs_preparing(model: Path, opts: SourceOptions) -> bool:
    return (model.is_file() or bool(opts.loras) or bool(opts.embeddings) or opts.vae is not None or opts.config is not None
            or opts.prediction_type is not None or opts.ema or opts.vae_decoder is not None)


def prepare_model(model: Path, work: Path, opts: SourceOptions) -> tuple[Path, dict]:
    """-> (a diffusers model folder inside `work`, the record of how it was made)."""
    import torch

    from .build import MODEL_EXTRAS, _quiet_model_libraries

    _quiet_model_libraries()
    record: dict = {"source": str(model.resolve())}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if model.is_file():
            pipe, record["checkpoint"] = _load_checkpoint(model, work, opts)
            tokenizer = opts.config / "tokenizer" if opts.config and opts.config.is_dir() else work / "config" / "tokenizer"
        elif model.is_dir():
            if opts.config is not None or opts.prediction_type is not None or opts.ema:
                raise SdrtError("--config, --prediction-type and --ema apply to single-file checkpoints; this is a diffusers folder, "
                                "whose own configs and weights say it")
            pipe = _load_folder(model)
            tokenizer = model / "tokenizer"
        else:
            raise SdrtError(f"{model}: no such file or folder")
        if opts.loras:
            record["loras"] = _merge_loras(pipe, opts.loras)
        if opts.embeddings:
            record["embeddings"] = _add_embeddings(pipe, opts.embeddings)
        if opts.vae is not None:
            pipe.vae = _load_vae(opts.vae, pipe.vae, work)
            record["vae"] = {"file": str(opts.vae.resolve()), "name": opts.vae.name}
        out = work / "model"
        pipe.save_pretrained(out, safe_serialization=True)
        if opts.vae_decoder is not None:
            _load_tiny_decoder(opts.vae_decoder, pipe.vae).save_pretrained(out / TINY_DECODER_FOLDER, safe_serialization=True)
            record["vae_decoder"] = {"file": str(opts.vae_decoder.resolve()), "name": opts.vae_decoder.name, "class": "AutoencoderTiny"}
    if model.is_dir() and (model / MODEL_EXTRAS).is_file():  # the folder's recommended settings and prompts stay with it
        shutil.copyfile(model / MODEL_EXTRAS, out / MODEL_EXTRAS)
    for name in TOKENIZER_FILES:  # the plain files sdrt's tokenizer reads (transformers 5 saves only tokenizer.json)
        if (tokenizer / name).is_file():
            shutil.copyfile(tokenizer / name, out / "tokenizer" / name)
    base = len(json.loads((out / "tokenizer" / "vocab.json").read_text(encoding="utf-8")))
    added = {token: i for token, i in pipe.tokenizer.get_added_vocab().items() if i >= base}
    if added:
        (out / "tokenizer" / ADDED_TOKENS).write_text(json.dumps(added, indent=2, ensure_ascii=False), encoding="utf-8")
    return out, record


def _load_folder(model: Path):
    import pickle

    import diffusers
    import torch

    from sdrt.model_info import read_model_info

    info = read_model_info(model)  # sdrt's checks of the folder first: their errors name the file and the key
    try:
        return getattr(diffusers, info.pipeline).from_pretrained(model, torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as exc:
        raise SdrtError(f"{model}: the weights could not be loaded: {first_line(exc)}") from None


@dataclass
class CheckpointPlan:
    """How a checkpoint file will be read, decided from its tensor names and shapes alone."""

    config: Path  # the diffusers config folder diffusers' loader gets
    arch: single_file.Architecture | None  # None: the user's --config folder
    how: str  # "detected" or "--config"
    prediction: str | None  # None: the configs' own, or (SD 2 text-to-image) the probe's once the U-Net is loaded
    decided: str | None  # what set the prediction type
    weights: str  # which U-Net weights


def plan_checkpoint(ckpt: single_file.Checkpoint, work: Path, opts: SourceOptions) -> CheckpointPlan:
    """Detect (or read --config), check every tensor's presence and shape, write the config folder."""
    if opts.config is not None and opts.config.is_dir():
        config, arch, how = opts.config, None, "--config"
    else:
        arch = single_file.architecture_from_yaml(opts.config, ckpt) if opts.config else single_file.detect(ckpt)
        single_file.check_tensors(ckpt, arch)
        how = "--config" if opts.config else "detected"
    has_ema = sum(k.startswith("model_ema.") for k in ckpt.tensors) > 100  # diffusers' own test
    if opts.ema and not has_ema:
        raise SdrtError(f"--ema: {ckpt.path} holds no separate EMA weights (no model_ema.* tensors); build it without --ema")
    weights = "EMA" if opts.ema else "training (the file also holds EMA weights: --ema uses them)" if has_ema else "the file's only"
    marker = single_file.prediction_type_marker(ckpt)
    prediction, decided = ((opts.prediction_type, "--prediction-type") if opts.prediction_type else
                           (marker, "the file says so") if marker else (None, None))
    if arch is not None:
        if prediction == "v_prediction" and arch.name == "sd2":
            arch = single_file.ARCHITECTURES["sd2-v"]
        config = single_file.write_config_folder(arch, work / "config", prediction or arch.scheduler.get("prediction_type", "epsilon"))
    return CheckpointPlan(config, arch, how, prediction, decided, weights)


def _load_checkpoint(path: Path, work: Path, opts: SourceOptions):
    import diffusers
    import torch

    from sdrt.model_info import read_json

    plan = plan_checkpoint(single_file.read_checkpoint(path), work, opts)
    arch, prediction, decided = plan.arch, plan.prediction, plan.decided
    pipeline = getattr(diffusers, str(read_json(plan.config / "model_index.json").get("_class_name")), diffusers.StableDiffusionPipeline)
    try:  # diffusers reads the file again, tensor by tensor
        pipe = pipeline.from_single_file(str(path), config=str(plan.config), local_files_only=True, torch_dtype=torch.float32,
                                         extract_ema=opts.ema)
    except (ValueError, KeyError, RuntimeError, NotImplementedError, OSError) as exc:
        raise SdrtError(f"{path}: diffusers could not load it with {'the --config folder' if arch is None else arch.published + ' configs'}: "
                        f"{first_line(exc)}") from None
    for name in ("unet", "vae", "text_encoder"):
        empty = [n for n, t in getattr(pipe, name).state_dict().items() if t.device.type == "meta"]
        if empty:
            raise SdrtError(f"{path}: {len(empty)} of the {name}'s tensors are not in the file, e.g. {empty[0]}")
    if arch is not None and arch.name == "sd2" and prediction is None:
        prediction, distance = single_file.probe_prediction_type(
            lambda x, t: pipe.unet(x, t, encoder_hidden_states=torch.zeros((1, 77, 1024))).sample)
        decided = f"probe (distance {distance:.2f}; below {single_file.PROBE_THRESHOLD} means epsilon)"
        if prediction == "v_prediction":
            arch = single_file.ARCHITECTURES["sd2-v"]
            pipe.unet.register_to_config(sample_size=arch.unet["sample_size"], upcast_attention=True)
            pipe.vae.register_to_config(sample_size=arch.vae["sample_size"])
    if prediction is not None:
        pipe.scheduler = type(pipe.scheduler).from_config({**pipe.scheduler.config, "prediction_type": prediction})
    if arch is not None and arch.pipeline == "StableDiffusionDepth2ImgPipeline":
        pipe = diffusers.StableDiffusionDepth2ImgPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                                                          scheduler=pipe.scheduler, depth_estimator=None, feature_extractor=None)
    record = {"read_as": arch.name if arch else "--config", "configs": arch.published if arch else str(opts.config.resolve()), "how": plan.how,
              "prediction_type": pipe.scheduler.config.prediction_type, "prediction_type_from": decided or "the configs",
              "unet_weights": plan.weights}
    log.info("read %s as %s; prediction type %s (%s)", path.name, record["configs"], record["prediction_type"], record["prediction_type_from"])
    return pipe, record


def _merge_loras(pipe, loras: tuple[tuple[Path, float], ...]) -> list[dict]:
    """Each LoRA merged into the fp32 weights at its weight (diffusers' loaders read the kohya/WebUI and
    diffusers/PEFT formats); a key that no layer of this model takes is an error, not a silent skip."""
    names = [f"lora{i}" for i in range(len(loras))]
    for (path, _), name in zip(loras, names):
        try:
            with _unused_keys() as unused:
                pipe.load_lora_weights(str(path), adapter_name=name)
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            mismatch = next((line for line in lines if line.startswith("size mismatch")), None)
            raise SdrtError(f"--lora {path}: diffusers could not merge it into this model ({mismatch or first_line(exc)})"
                            + ("; it was made for another architecture" if mismatch else "")) from None
        if unused:
            raise SdrtError(f"--lora {path}: {len(unused)} of its tensors fit no layer of this model (e.g. {unused[0]}); it was made for "
                            "another architecture")
    pipe.set_adapters(names, adapter_weights=[w for _, w in loras])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()
    return [{"file": str(path.resolve()), "name": path.name, "weight": w} for path, w in loras]


def _load_vae(source: Path, model_vae, work: Path):
    """--vae: a diffusers VAE folder (or a model folder's vae/), or a single file in the original or diffusers layout,
    read with the model's VAE config; every tensor must be there, the model's scaling factor is kept."""
    import torch
    from diffusers import AutoencoderKL

    try:
        if source.is_dir():
            folder = source / "vae" if (source / "vae" / "config.json").is_file() else source
            if not (folder / "config.json").is_file():
                raise SdrtError(f"--vae {source}: a folder needs config.json (a diffusers VAE folder) or vae/config.json (a model folder)")
            vae = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32)
        else:
            keys = single_file.read_checkpoint(source).tensors
            config = work / "vae-config"
            model_vae.save_config(config)
            if any(".down_blocks." in k or ".up_blocks." in k for k in keys):  # already diffusers' names
                from safetensors.torch import load_file

                vae = AutoencoderKL.from_config(model_vae.config)
                state = load_file(str(source)) if source.suffix == ".safetensors" else torch.load(source, map_location="cpu", weights_only=True)
                vae.load_state_dict(state, strict=True)
            else:
                vae = AutoencoderKL.from_single_file(str(source), config=str(config), local_files_only=True, torch_dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError, OSError, NotImplementedError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = next((line for line in lines if line.startswith(("size mismatch", "Missing key"))), first_line(exc))
        reason = reason.split(". If you want")[0].replace("Cannot load  because ", "")  # not diffusers' advice to load it anyway
        raise SdrtError(f"--vae {source}: it does not fit this model's VAE ({reason})") from None
    empty = [n for n, t in vae.state_dict().items() if t.device.type == "meta"]
    if empty:
        raise SdrtError(f"--vae {source}: {len(empty)} of the VAE's tensors are not in it, e.g. {empty[0]}; it does not fit this model's VAE")
    shapes = {n: tuple(t.shape) for n, t in model_vae.state_dict().items()}
    wrong = [n for n, t in vae.state_dict().items() if shapes.get(n) != tuple(t.shape)]
    if wrong or shapes.keys() != vae.state_dict().keys():
        raise SdrtError(f"--vae {source}: its layers differ from this model's VAE (e.g. {(wrong or sorted(shapes.keys() ^ vae.state_dict().keys()))[0]})")
    vae.register_to_config(scaling_factor=model_vae.config.scaling_factor)
    return vae.eval()


def _load_tiny_decoder(source: Path, model_vae):
    """--vae-decoder: a diffusers AutoencoderTiny folder whose latents are the model's (channels, scale factor)."""
    import torch
    from diffusers import AutoencoderTiny

    try:
        tiny = AutoencoderTiny.from_pretrained(source, torch_dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise SdrtError(f"--vae-decoder {source}: not a diffusers AutoencoderTiny folder ({first_line(exc)})") from None
    c, ours = tiny.config, model_vae.config
    scale, our_scale = c.upsampling_scaling_factor ** (len(c.decoder_block_out_channels) - 1), 2 ** (len(ours.block_out_channels) - 1)
    if (c.latent_channels, scale) != (ours.latent_channels, our_scale):
        raise SdrtError(f"--vae-decoder {source}: it decodes {c.latent_channels}-channel latents {scale}x up, this model's VAE "
                        f"{ours.latent_channels}-channel latents {our_scale}x up")
    return tiny.eval()


def _add_embeddings(pipe, embeddings: tuple[tuple[Path, str], ...]) -> list[dict]:
    """Textual-inversion embeddings (WebUI .pt/.safetensors, diffusers learned_embeds) as new tokens and rows of the
    text encoder's embedding table, by diffusers' loader (which reads pickles with torch's safe loader only)."""
    import pickle

    done = []
    for path, token in embeddings:
        before = len(pipe.tokenizer)
        try:
            pipe.load_textual_inversion(str(path), token=token)
        except pickle.UnpicklingError as exc:
            raise SdrtError(f"--embedding {path}: this pickle needs code that torch's safe loader (weights_only) refuses to run "
                            f"({first_line(exc).split('. ')[0]}); sdrt never runs code from a model file") from None
        except (ValueError, KeyError, RuntimeError, OSError, TypeError) as exc:
            raise SdrtError(f"--embedding {path}: diffusers could not add it to this model ({first_line(exc)}); accepted are WebUI .pt/"
                            ".safetensors embeddings and diffusers learned_embeds files made for this model's text encoder") from None
        done.append({"file": str(path.resolve()), "name": path.name, "token": token, "vectors": len(pipe.tokenizer) - before})
    return done


class _unused_keys:
    """Collects the keys diffusers/PEFT report as unexpected while a LoRA loads (they log rather than raise)."""

    LOGGERS = ("diffusers", "peft")

    def __enter__(self) -> list[str]:
        self.found: list[str] = []
        self.saved = [(logger, logger.level, list(logger.handlers)) for logger in map(logging.getLogger, self.LOGGERS)]
        for logger, _, _ in self.saved:
            logger.handlers = [_KeyCatcher(self.found)]  # theirs would print the warning; the error says it
            logger.setLevel(logging.WARNING)
        return self.found

    def __exit__(self, *exc) -> None:
        for logger, level, handlers in self.saved:
            logger.handlers = handlers
            logger.setLevel(level)


class _KeyCatcher(logging.Handler):
    def __init__(self, found: list[str]):
        super().__init__(logging.WARNING)
        self.found = found

    def emit(self, record: logging.LogRecord) -> None:
        import re

        message = record.getMessage()
        if "unexpected keys" in message.lower():
            self.found.extend(re.findall(r"[\w.]+\.(?:weight|alpha|bias)", message) or [message[:200]])

"""One engine for a server, loaded as the runner loads a variant's (weights, cache policy, engine)."""
from __future__ import annotations

import dataclasses

import torch

from bench.errors import UsageError, VariantUnsupported
from bench.models.source import ModelSource
from bench.models.visual import load_image
from bench.run import host
from bench.run.limits import check_sizes, model_dims
from bench.run.preprocess import place_preprocessing
from bench.run.runner import identity_columns, resolve_device, resolve_dtype
from variants import parse_variant


def model_source(cfg) -> ModelSource:
    """The checkpoint or preset a run config names (a usage error when there is none such)."""
    return ModelSource(cfg.model_path, cfg.preset, cfg.conv_mode, cfg.seed, cfg.max_tiles)


def check_default_request(cfg, source: ModelSource) -> None:
    """A usage error unless the run config names one variant this device can run, --image-path is
    an image, and a request of the default max_tokens (--max-new-tokens) with its images fits the
    model's positions (and its KV cache the device): all known before the model loads. The
    request shows as many images as the model takes together (one, or InternVideo2.5's 4)."""
    served_variant(cfg, source)
    load_image(cfg.image_path)
    device = resolve_device(cfg.device)
    dims = model_dims(cfg.model_path, cfg.preset)
    cfg.points = [dataclasses.replace(p, num_images=dims.visual_group) for p in cfg.points]
    check_sizes(cfg, dims, source.name, [], None, device, resolve_dtype(cfg.dtype, device))


def check_loaded_default_request(engine, cfg, source: ModelSource, max_batch: int) -> None:
    """check_default_request once the model is loaded, on its tokenizer and template: the warm-up
    requests (the default max_tokens, --max-new-tokens, with the images the model takes together)
    tokenized exactly fit the model's positions, and their KV cache at --max-batch the device; a
    usage error naming the flag otherwise, before any warm-up runs. (Before loading only lower
    bounds are known: a default that no request could use would start a server that refuses
    every request without max_tokens.)"""
    from bench.models.prompts import WARMUP_QUESTIONS
    from bench.models.visual import VisualInput
    from bench.run.limits import check_prompt, loaded_max_pos
    from bench.run.workload import derived_images

    adapter = engine.adapter
    dims = model_dims(cfg.model_path, cfg.preset)
    dims = dataclasses.replace(dims, max_pos=loaded_max_pos(getattr(adapter, "model", None)) or dims.max_pos)
    visual = VisualInput(tuple(derived_images(load_image(cfg.image_path), adapter.visual_group)))
    longest = max((adapter.prepare_text(q, visual) for q in WARMUP_QUESTIONS), key=lambda p: p.prompt_tokens)
    point = dataclasses.replace(cfg.points[0], new_tokens=cfg.max_new_tokens, batch_size=max_batch,
                                num_images=adapter.visual_group)
    device = resolve_device(cfg.device)
    check_prompt(cfg, dims, source.name, point, longest, None, device, resolve_dtype(cfg.dtype, device),
                 "--max-new-tokens", "--max-batch")


def served_variant(cfg, source: ModelSource):
    """The one variant the run config names, or a usage error (several, or one this device or
    model cannot run)."""
    specs = cfg.variant_specs
    if len(specs) != 1:
        raise UsageError(f"serve runs one variant; --variants/--engine name {len(specs)}: {', '.join(specs)}")
    variant = parse_variant(specs[0])
    reason = variant.unavailable_reason(resolve_device(cfg.device)) or variant.weights.source_reason(source)
    if reason:
        raise UsageError(f"variant {variant.name} cannot run here: {reason}")
    return variant


def served_identity(cfg, source: ModelSource) -> dict:
    """What the server runs, in the result key's columns an in-process row has (model, family,
    weights, variant, engine, device, dtype): its /v1/models entry carries them, and endpoint mode
    files them in its rows (bench.serve.client.check_server)."""
    device = resolve_device(cfg.device)
    return identity_columns(source, served_variant(cfg, source), device, resolve_dtype(cfg.dtype, device))


def load_engine(cfg, source: ModelSource):
    """(engine, variant name, model name) for a run config naming exactly one variant, its model
    `source` (model_source(cfg))."""
    variant = served_variant(cfg, source)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    host.set_cpu_threads(host.cpu_threads(cfg.cpu_threads, device))
    options = variant.weights.options(cfg)
    loaded = variant.weights.load(source, device, dtype, options)
    place_preprocessing(loaded.adapter, cfg.preprocess, device, load_image(cfg.image_path))
    policy = variant.cache.make_policy(variant.cache.options(cfg), loaded.weights_key)
    try:  # what only the loaded model shows (e.g. an int4 kernel this device cannot run)
        engine = variant.engine.make_engine(loaded.adapter, policy, **cfg.engine_options(),
                                            **variant.weights.engine_options(options))
    except VariantUnsupported as e:
        raise UsageError(f"variant {variant.name} cannot run here: {e}") from None
    return engine, variant.name, source.name


def warm_up(engine, image, max_batch: int, max_tokens: int, image_file: bytes | None = None) -> int:
    """Run the image (with derived ones up to the images the model takes together) with warm-up
    questions (never measured ones) at every batch size up to
    `max_batch`, `max_tokens` tokens each, before the server listens: an engine compiles and
    captures each batch shape on its first use, which would otherwise land inside a served
    request's TTFT (on the H200 a llava-1.5-7b server's first batches of 2 to 16 requests took
    seconds). With a prefix cache each size runs twice, the second a hit, so both paths are
    ready for requests showing that image (`image_file`: its file's bytes, which key it as a
    request sending that file keys it). Returns the batches run; a batch the device has no memory
    for is a usage error naming --max-batch."""
    from bench.models.prompts import WARMUP_QUESTIONS
    from bench.models.visual import VisualInput
    from bench.run.workload import derived_images

    # as many images as the model takes together (InternVideo2.5: 4), as a run's --num-images
    images = tuple(derived_images(image, engine.adapter.visual_group))
    # one image: keyed by its file's bytes, as a request sending that file is, so its prefix is a hit
    visual = VisualInput(images, encoded=(image_file,) if image_file is not None and len(images) == 1 else None)
    runs = 2 if getattr(engine.policy, "stateful", False) else 1
    done = 0
    for size in range(1, max_batch + 1):
        rows = [(visual, WARMUP_QUESTIONS[i % len(WARMUP_QUESTIONS)]) for i in range(size)]
        for _ in range(runs):
            try:
                engine.run_batch(rows, max_tokens)
            except torch.OutOfMemoryError:
                raise UsageError(f"--max-batch {max_batch}: a batch of {size} requests ({max_tokens} tokens each) "
                                 "runs out of device memory while warming up; lower --max-batch or "
                                 "--max-new-tokens") from None
            done += 1
    return done

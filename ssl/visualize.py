"""`python -m ssl.visualize ckpt=PATH/teacher.pt [data=NAME] [key=value ...]`: pictures of what a backbone learned.

Rebuilds the frozen backbone from the export, as ssl.linear_eval does, and writes PNGs under `<run_dir>` (default
`<ckpt dir>/visualize_<ckpt stem>/`; options in configs/visualize.yaml):
  * embedding.png: a 2-D map of the pooled embeddings of `embedding.points` test images, coloured by class: t-SNE
    with the `viz` extra (scikit-learn, `pip install -e .[viz]`), else the first two principal components;
  * retrieval.png: `retrieval.queries` test images and their `retrieval.k` nearest training images (cosine
    similarity of the embeddings, over `retrieval.gallery` training images), neighbours of another class framed
    in red; the title gives the share of same-class neighbours over all the embedding's test images;
  * dense_pca.png: `images` test images above the first three principal components of their `forward_dense`
    maps as RGB (one PCA shared by all the images, so colours compare across them). Inputs are upscaled by the
    smallest whole factor that makes the map at least `dense.min_grid` cells wide: a 28 px image leaves a ResNet's
    last stage 1x1;
  * attention.png (ViT exports only): the CLS token's attention to the patches in the last block, averaged over
    the heads and per head, for the same images.
Prints one summary line naming the files; with `logger=wandb` the pictures are also logged to a wandb run (offline
unless `logger.mode=online`) in the same folder.
"""

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ssl.device import autocast
from ssl.errors import UserError, os_failure, run_cli
from ssl.eval import cli
from ssl.eval.features import extract_features
from ssl.eval.preprocess import normalise, resize_center_crop
from ssl.files import atomic_write
from ssl.loggers import start_wandb
from ssl.models.vit import VisionTransformer

EMBEDDINGS = ("auto", "tsne", "pca")
LOGGERS = ("none", "wandb")
VIZ_HINT = "pip install -e .[viz]"
DPI = 100
MISTAKE, MATCH = "#d62728", "#2ca02c"  # frame colours of retrieved neighbours: another class / the query's class


# ---------------------------------------------------------------------------------------------------------
# Choosing images


def spread_over_classes(labels: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` indices into `labels`, drawn at random but covering as many classes as possible: first one image of
    each class, then a second of each, and so on (classes in order of their first draw)."""
    order = torch.randperm(len(labels), generator=generator)
    drawn = labels.cpu()[order]
    rank = torch.zeros(len(order), dtype=torch.int64)  # how many earlier draws share this one's class
    seen: dict[int, int] = {}
    for position, label in enumerate(drawn.tolist()):
        rank[position] = seen.get(label, 0)
        seen[label] = rank[position].item() + 1
    # Stable: within a rank, keep the draw order.
    return order[torch.sort(rank, stable=True).indices[:count]]


def random_subset(total: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` (at most `total`) distinct indices of `range(total)`, in ascending order."""
    return torch.randperm(total, generator=generator)[:count].sort().values


# ---------------------------------------------------------------------------------------------------------
# Computing what is drawn


def tsne_class() -> type | None:
    """scikit-learn's TSNE, or None when the `viz` extra is not installed."""
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        return None
    return TSNE


def pca(features: torch.Tensor, components: int) -> torch.Tensor:
    """Projections (N, components) of the rows of `features` on their first principal axes, signs fixed so each
    axis's largest-magnitude projection is positive (the same picture on every run)."""
    centred = features.float() - features.float().mean(dim=0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    projected = centred @ vh[:components].T
    largest = projected.abs().argmax(dim=0)
    signs = projected[largest, torch.arange(projected.shape[1])].sign()
    return projected * torch.where(signs == 0, torch.ones_like(signs), signs)


def embed_2d(features: torch.Tensor, method: str, perplexity: float, seed: int) -> tuple[np.ndarray, str]:
    """2-D coordinates of the rows of `features` and the name of the method used (`tsne` or `pca`)."""
    tsne = tsne_class() if method in ("auto", "tsne") else None
    if method == "tsne" and tsne is None:
        raise UserError(f"embedding.method=tsne needs scikit-learn: `{VIZ_HINT}`, or pass embedding.method=pca")
    if tsne is None or len(features) < 4:
        return pca(features, 2).cpu().numpy(), "pca"
    # Perplexity must stay below the number of points; tiny sets get a proportionally smaller one.
    perplexity = min(perplexity, max(1.0, (len(features) - 1) / 3))
    points = tsne(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        features.cpu().double().numpy())
    return np.asarray(points), "tsne"


def nearest_neighbours(queries: torch.Tensor, gallery: torch.Tensor, k: int,
                       chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and indices (both (Q, k), best first) of each query's `k` nearest gallery rows."""
    gallery = F.normalize(gallery.float(), dim=1)
    scores, indices = [], []
    for start in range(0, len(queries), chunk):
        similarity = F.normalize(queries[start:start + chunk].float(), dim=1) @ gallery.T
        best = similarity.topk(k, dim=1)
        scores.append(best.values)
        indices.append(best.indices)
    return torch.cat(scores), torch.cat(indices)


def dense_input_size(backbone: nn.Module, meta: dict[str, Any], min_grid: int, device: torch.device) -> int:
    """The input size at which `forward_dense` gives a map at least `min_grid` cells wide: the export's
    `input_size` times the smallest whole factor that does it (the input size itself when `min_grid` <= 0)."""
    size = meta["input_size"]
    if min_grid <= 0:
        return size
    probe = torch.zeros(1, meta["channels"], size, size, device=device)
    with torch.inference_mode():
        grid = min(backbone.forward_dense(probe).shape[-2:])
    return size * max(1, math.ceil(min_grid / grid))


@torch.inference_mode()
def dense_maps(backbone: nn.Module, images: torch.Tensor, meta: dict[str, Any],
               size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`forward_dense` (B, D, h, w) of uint8 `images` normalised and resized to `size`, and for a ViT the last
    block's CLS attention to the patches (B, heads, h, w) from the same pass (None for other backbones)."""
    inputs = resize_center_crop(normalise(images, meta["mean"], meta["std"]), size)
    if not isinstance(backbone, VisionTransformer):
        with autocast(inputs.device):
            return backbone.forward_dense(inputs).float(), None
    captured: dict[str, torch.Tensor] = {}
    attention = backbone.blocks[-1].attn
    # The last block's attention input (its pre-norm tokens, CLS first): the weights are recomputed from it,
    # as the fused kernel the model runs never materialises them.
    hook = attention.register_forward_pre_hook(lambda module, args: captured.__setitem__("tokens", args[0]))
    try:
        with autocast(inputs.device):
            dense = backbone.forward_dense(inputs).float()
    finally:
        hook.remove()
    return dense, cls_attention(attention, captured["tokens"], dense.shape[-2:])


def cls_attention(attention: nn.Module, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """softmax(q_cls k^T / sqrt(d_head)) of an `ssl.models.vit.Attention` on `tokens` (B, 1 + h*w, D), without the
    CLS-to-CLS weight: (B, heads, h, w), each map summing to at most 1."""
    batch, count, dim = tokens.shape
    heads = attention.num_heads
    qkv = attention.qkv(tokens.float()).reshape(batch, count, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    query, keys = qkv[0][:, :, :1].float(), qkv[1].float()  # (B, heads, 1, d_head), (B, heads, N, d_head)
    weights = (query @ keys.transpose(-2, -1) * (dim // heads) ** -0.5).softmax(dim=-1)
    return weights[:, :, 0, 1:].reshape(batch, heads, *grid)


def dense_pca_rgb(dense: torch.Tensor, size: int) -> torch.Tensor:
    """First three principal components of the feature vectors of all cells of all maps (B, D, h, w), each scaled
    to [0, 1] over the batch, as RGB images (B, size, size, 3) upsampled bilinearly."""
    batch, dim, height, width = dense.shape
    cells = dense.permute(0, 2, 3, 1).reshape(-1, dim)
    components = pca(cells, min(3, dim, len(cells)))
    if components.shape[1] < 3:  # a single 1x1 map has fewer than three axes: pad with grey
        components = F.pad(components, (0, 3 - components.shape[1]))
    low, high = components.min(dim=0).values, components.max(dim=0).values
    scaled = (components - low) / (high - low).clamp_min(1e-12)
    maps = scaled.reshape(batch, height, width, 3).permute(0, 3, 1, 2)
    return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1).permute(0, 2, 3, 1)


# ---------------------------------------------------------------------------------------------------------
# Drawing


def show_image(axes: Axes, image: torch.Tensor) -> None:
    """A uint8 (C, H, W) image, grey for one channel, without ticks."""
    image = image.cpu()
    if image.shape[0] == 1:
        axes.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=255)
    else:
        axes.imshow(image.permute(1, 2, 0).numpy())
    hide_ticks(axes)


def hide_ticks(axes: Axes) -> None:
    axes.set_xticks([])
    axes.set_yticks([])


def frame(axes: Axes, colour: str, width: float) -> None:
    for spine in axes.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(width)


def embedding_figure(points: np.ndarray, labels: torch.Tensor, classes: list[str], title: str) -> Figure:
    figure = Figure(figsize=(7.5, 6), dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    labels = labels.cpu().numpy()
    palette = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    for index, name in enumerate(classes):
        chosen = labels == index
        if chosen.any():
            colour = palette(index % palette.N)
            axes.scatter(points[chosen, 0], points[chosen, 1], s=4, color=colour, label=name, alpha=0.8,
                         linewidths=0)
    hide_ticks(axes)
    axes.set_title(title, fontsize=10)
    if len(classes) <= 20:
        axes.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=3, frameon=False)
    return figure


def retrieval_figure(queries: torch.Tensor, query_labels: torch.Tensor, neighbours: torch.Tensor,
                     neighbour_labels: torch.Tensor, scores: torch.Tensor, classes: list[str], title: str) -> Figure:
    """One row per query: the query, then its neighbours best first, titled with class and cosine similarity."""
    rows, k = neighbour_labels.shape
    figure = Figure(figsize=(1.1 * (k + 1), 1.25 * rows + 0.4), dpi=DPI, layout="constrained")
    grid = figure.subplots(rows, k + 1, squeeze=False)
    for row in range(rows):
        query_class = int(query_labels[row])
        show_image(grid[row, 0], queries[row])
        grid[row, 0].set_title(f"query: {classes[query_class]}", fontsize=7, fontweight="bold")
        frame(grid[row, 0], "black", 2)
        for column in range(k):
            axes = grid[row, column + 1]
            label = int(neighbour_labels[row, column])
            show_image(axes, neighbours[row, column])
            axes.set_title(f"{classes[label]} {scores[row, column]:.3f}", fontsize=6,
                           color="black" if label == query_class else MISTAKE)
            frame(axes, MATCH if label == query_class else MISTAKE, 1 if label == query_class else 3)
    figure.suptitle(title, fontsize=9)
    return figure


def image_rows_figure(images: torch.Tensor, rows: list[tuple[str, Callable[[Axes, int], None]]],
                      titles: list[str]) -> Figure:
    """The images on top, then one row per (name, draw(axes, image index)) below them."""
    columns = len(images)
    figure = Figure(figsize=(1.2 * columns + 0.6, 1.25 * (len(rows) + 1)), dpi=DPI, layout="constrained")
    grid = figure.subplots(len(rows) + 1, columns, squeeze=False)
    for column in range(columns):
        show_image(grid[0, column], images[column])
        grid[0, column].set_title(titles[column], fontsize=7)
        for row, (_, draw) in enumerate(rows, start=1):
            draw(grid[row, column], column)
            hide_ticks(grid[row, column])
    for row, (name, _) in enumerate(rows, start=1):
        grid[row, 0].set_ylabel(name, fontsize=7)
    return figure


def attention_rows(attention: torch.Tensor, size: int) -> list[tuple[str, Callable[[Axes, int], None]]]:
    """Rows of CLS-attention maps (B, heads, h, w): the mean over heads, then each head; each map scaled to its
    own maximum and upsampled (nearest: one square per patch) to `size`."""
    maps = torch.cat((attention.mean(dim=1, keepdim=True), attention), dim=1)
    maps = maps / maps.flatten(2).amax(dim=2).clamp_min(1e-12)[..., None, None]
    maps = F.interpolate(maps, size=(size, size), mode="nearest").cpu().numpy()
    names = ["mean of heads", *(f"head {head}" for head in range(attention.shape[1]))]

    def drawer(row: int) -> Callable[[Axes, int], None]:
        return lambda axes, column: axes.imshow(maps[column, row], cmap="inferno", vmin=0, vmax=1)

    return [(name, drawer(row)) for row, name in enumerate(names)]


# ---------------------------------------------------------------------------------------------------------
# The entry point


def positive(cfg: DictConfig, key: str) -> int:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{key}={value} must be a positive whole number")
    return value


def write_figures(directory: Path, figures: dict[str, Figure]) -> list[Path]:
    """Save each figure as `<directory>/<name>.png`, all or none (atomically); returns the paths."""
    paths = {directory / f"{name}.png": figure for name, figure in figures.items()}
    try:
        atomic_write({path: lambda handle, figure=figure: figure.savefig(handle, format="png", dpi=DPI)
                      for path, figure in paths.items()})
    except OSError as error:
        raise os_failure(error, then=cli.ELSEWHERE) from None
    return list(paths)


def log_to_wandb(cfg: DictConfig, directory: Path, paths: list[Path]) -> None:
    """With `logger=wandb`: one wandb run (in `directory`) holding each picture under its file's stem."""
    if cfg.logger.name == "none":
        return
    run = start_wandb(directory, OmegaConf.to_container(cfg.logger, resolve=True),
                       OmegaConf.to_container(cfg, resolve=True))
    import wandb

    run.log({path.stem: wandb.Image(str(path)) for path in paths})
    run.finish()


def visualize(cfg: DictConfig) -> dict[str, Any]:
    """Draw the pictures of export `cfg.ckpt` on `cfg.data`; returns what was written and the retrieval score."""
    if cfg.embedding.method not in EMBEDDINGS:
        raise UserError(f"unknown embedding.method={cfg.embedding.method}; choose one of: {', '.join(EMBEDDINGS)}")
    if cfg.logger.name not in LOGGERS:
        raise UserError(f"unknown logger {cfg.logger.name!r}; choose one of: {', '.join(LOGGERS)}")
    points, queries, k = (positive(cfg, key) for key in ("embedding.points", "retrieval.queries", "retrieval.k"))
    gallery_size, image_count = positive(cfg, "retrieval.gallery"), positive(cfg, "images")
    perplexity = cfg.embedding.perplexity
    if not isinstance(perplexity, int | float) or isinstance(perplexity, bool) or perplexity <= 0:
        raise UserError(f"embedding.perplexity={perplexity} must be a positive number")
    ckpt, device, backbone = cli.load_ckpt(cfg)
    meta = backbone.export_meta
    cli.require_data(cfg)
    train_images, train_labels, classes = cli.load_split(cfg.data, "train_split", meta, device)
    test_images, test_labels, _ = cli.load_split(cfg.data, "test_split", meta, device)
    generator = torch.Generator().manual_seed(cfg.seed)

    # Pooled embeddings: the map's test points (the queries among them) and the retrieval gallery.
    shown = spread_over_classes(test_labels, min(points, len(test_labels)), generator).to(test_labels.device)
    gallery = random_subset(len(train_labels), gallery_size, generator).to(train_labels.device)
    test_features = extract_features(backbone, test_images[shown], meta, device, cfg.data.batch_size)
    gallery_features = extract_features(backbone, train_images[gallery], meta, device, cfg.data.batch_size)
    k = min(k, len(gallery))

    coordinates, method = embed_2d(test_features, cfg.embedding.method, perplexity, cfg.seed)
    if method == "pca" and cfg.embedding.method == "auto" and tsne_class() is None:
        print(f"hint: embedding.png is a PCA map; for t-SNE install the viz extra: {VIZ_HINT}")
    scores, found = nearest_neighbours(test_features, gallery_features, k)
    neighbour_labels = train_labels[gallery][found]
    precision = 100 * (neighbour_labels == test_labels[shown][:, None]).float().mean().item()
    name = f"{meta['backbone']['name']} {meta['method']} {meta['role']} (epoch {meta['epoch']}) on {cfg.data.name}"
    method_name = {"tsne": "t-SNE", "pca": "PCA"}[method]

    figures = {"embedding": embedding_figure(coordinates, test_labels[shown], classes,
                                             f"{method_name} of {len(shown)} test embeddings: {name}")}
    rows = min(queries, len(shown))  # `shown` starts with one image per class: the queries cover the classes
    figures["retrieval"] = retrieval_figure(
        test_images[shown[:rows]], test_labels[shown[:rows]], train_images[gallery][found[:rows]],
        neighbour_labels[:rows], scores[:rows], classes,
        f"{name}: top-{k} of {len(gallery)} training images by cosine similarity\nsame class "
        f"{precision:.1f}% over {len(shown)} test images (red: another class)")

    picked = shown[:min(image_count, len(shown))]
    size = dense_input_size(backbone, meta, cfg.dense.min_grid, device)
    dense, attention = dense_maps(backbone, test_images[picked], meta, size)
    rgb = dense_pca_rgb(dense, size).cpu().numpy()
    titles = [classes[int(label)] for label in test_labels[picked]]
    grid_text = f"{dense.shape[-2]}x{dense.shape[-1]} map at {size} px"
    figures["dense_pca"] = image_rows_figure(
        test_images[picked], [(f"PCA 1-3 as RGB\n({grid_text})", lambda axes, column: axes.imshow(rgb[column]))],
        titles)
    figures["dense_pca"].suptitle(f"{name}: forward_dense, one PCA over all {len(picked)} images", fontsize=9)
    if attention is not None:
        figures["attention"] = image_rows_figure(test_images[picked], attention_rows(attention, size), titles)
        figures["attention"].suptitle(f"{name}: last block's CLS attention ({grid_text})", fontsize=9)

    directory = cli.results_dir(cfg, ckpt, "visualize")
    paths = write_figures(directory, figures)
    log_to_wandb(cfg, directory, paths)
    print(f"wrote {', '.join(path.name for path in paths)} to {directory} "
          f"(embedding={method}, neighbours_same_class={precision:.1f}%)")
    return {"files": paths, "embedding": method, "neighbours_same_class": precision, "dense_size": size}


@hydra.main(config_path="../configs", config_name="visualize", version_base=None)
def main(cfg: DictConfig) -> None:
    run_cli(lambda: visualize(cfg))


if __name__ == "__main__":
    run_cli(cli.select_data_from_export)
    main()

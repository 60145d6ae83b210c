"""Hand a model to the Hugging Face ecosystem, or take one from it.  python convert.py --help

    python convert.py runs/c10/ckpt.npz exports/c10-hf        # a checkpoint -> a Hugging Face folder
    python convert.py path/to/imagegpt-small imported.npz      # a Hugging Face folder -> a checkpoint

The folder holds config.json, model.safetensors and preprocessor_config.json (the palette, and the
box filter the data was downsampled with), which transformers' ImageGPTForCausalImageModeling and
ImageGPTImageProcessor load. The checkpoint is a train.py checkpoint's model and palette (without a
run's settings: probe.py then needs --data). To publish a folder: huggingface_hub's
`HfApi().upload_folder(folder_path=..., repo_id=...)`, after `huggingface-cli login`.
"""
import sys
from pathlib import Path

from minigpt_img.cli import Parser, add_threads_flag, run


def parse(argv=None):
    ap = Parser(prog="convert.py", description="Convert between a train.py checkpoint (.npz) and a Hugging "
                "Face ImageGPT folder; the direction follows the source.")
    ap.add_argument("source", help="a train.py checkpoint (.npz) or a Hugging Face ImageGPT folder")
    ap.add_argument("dest", help="the folder to export to, or the .npz checkpoint to import to (must not exist)")
    add_threads_flag(ap)
    return ap.parse_args(argv)


def convert(args, comm) -> int:
    from minigpt_img.checkpoint import export_hf, load_hf, load_model, save_model
    from minigpt_img.errors import CheckpointError

    source, dest = Path(args.source), Path(args.dest)
    if dest.exists():
        raise CheckpointError(f"{dest} exists: choose a new destination (nothing was overwritten)")
    if source.is_dir():
        model, palette = load_hf(source)
        if palette is None:
            raise CheckpointError(f"{source} has no preprocessor_config.json with the palette ('clusters'): "
                                  "without it the model's tokens mean no colours")
        save_model(dest, model, palette, meta={"imported_from": str(source)})
        print(f"wrote {dest}: {source} as a checkpoint ({model.config.n_layer} layers, width "
              f"{model.config.n_embd}, {model.config.n_px}x{model.config.n_px})")
    else:
        model, palette, _, _ = load_model(source)
        export_hf(model, dest, palette)
        print(f"wrote {dest}: config.json, model.safetensors" +
              (", preprocessor_config.json (palette, box filter)" if palette is not None else ""))
    return 0


def main(argv=None) -> int:
    return run(convert, parse(argv))


if __name__ == "__main__":
    sys.exit(main())

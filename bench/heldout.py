"""Score deblurring checkpoints on held-out pairs: tiles of photos that their training set never saw.

    .venv/bin/tpdiff make-demo --photos ~/wallpapers --output /tmp/pool      # more photos, paired tiles
    .venv/bin/python bench/heldout.py --pool /tmp/pool --trained-on datasets_lmdb/demo \\
        experiments/TPDiff_Demo_Stage2/models/net_g_400.pth [more checkpoints ...]

A set built by ``tpdiff make-demo`` keeps the sharp original of every blurry training tile
(``train_blur_gt.lmdb``), so its blurry training tiles are pairs. This script scores the pairs of ``--pool`` whose
photo appears nowhere in ``--trained-on`` (the set the checkpoints were trained on; its ``info.json`` names each
tile's photo): with the demo set that leaves exactly the photos that ``--photos`` added. The demo's own validation
pairs are also its test pairs, and its recipe was chosen on them, so this is the check that a recipe's gain carries
over to other images.

Each checkpoint runs the way ``tpdiff deblur`` runs it (``Deblurrer.from_checkpoint``: the network options stored in
the checkpoint; TP-Diff's prior sampled by the DM, seed 0). One table: the input and each checkpoint, mean PSNR /
SSIM (basicsr's, RGB, no crop), the periodic-artifact measure and the coarse part, as ``bench/quality.py`` scores
them (its ``evaluate``).
"""
import argparse
import json
import os
import sys

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # see bench/README.md: spinning OpenMP threads on 2 cores
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402  (bench/ is not a package)


def photos_of(data_root):
    """The photo of every tile of a make-demo set, from its ``info.json``: ``{'<set>/<key>': photo}``."""
    path = os.path.join(data_root, 'info.json')
    if not os.path.isfile(path):
        raise SystemExit(f'{path}: no such file (--pool and --trained-on are folders written by `tpdiff make-demo`)')
    with open(path) as f:
        return {key: entry['source'] for key, entry in json.load(f)['images'].items()}


def heldout_pairs(pool, trained_on, every=1):
    """``[(key, lq [1, 3, H, W], blurry uint8 BGR, sharp uint8 BGR)]``: ``pool``'s blurry training tiles and their
    sharp originals, for the photos that no tile of ``trained_on`` came from; every ``every``-th in key order."""
    seen = set(photos_of(trained_on).values())
    prefix = 'train_blur/'
    keys = sorted(k[len(prefix):] for k, photo in photos_of(pool).items()
                  if k.startswith(prefix) and photo not in seen)[::every]
    if not keys:
        raise SystemExit(f'{pool}: every blurry tile comes from a photo of {trained_on}: nothing is held out '
                         '(build --pool with `tpdiff make-demo --photos DIR`)')
    return quality.val_pairs(pool, 'train_blur', 'train_blur_gt', keys)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('checkpoints', nargs='+', help='network checkpoints (net_g_*.pth) that store their options')
    p.add_argument('--pool', required=True, help='a make-demo set built with --photos (the held-out pairs)')
    p.add_argument('--trained-on', required=True, help='the make-demo set the checkpoints were trained on')
    p.add_argument('--every', type=int, default=1, help='score every N-th held-out pair (default 1: all)')
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s)')
    p.add_argument('--json', default=None, help='write the scores to this file')
    args = p.parse_args(argv)
    import torch
    from tpdiff_plugin.inference import Deblurrer
    if args.threads:
        torch.set_num_threads(args.threads)
    val = heldout_pairs(args.pool, args.trained_on, args.every)
    rows = [('input (blurry)', quality.evaluate(lambda lq: lq, val)[0])]
    for path in args.checkpoints:
        deblur = Deblurrer.from_checkpoint(path)
        rows.append((path, quality.evaluate(deblur, val)[0]))
    print(f'{len(val)} held-out pairs from {len({k.split("-", 1)[0] for k, *_ in val})} photo(s) of {args.pool}\n')
    print('| checkpoint | PSNR | SSIM | gain dB | artifact dB | coarse part |\n|---|---|---|---|---|---|')
    base = rows[0][1]['psnr']
    for name, m in rows:
        print(f"| {name} | {m['psnr']:.4f} | {m['ssim']:.4f} | {m['psnr'] - base:+.4f} | {m['artifact_db']:+.2f} | "
              f"{m['coarse_psnr']:.4f} / {m['coarse_ssim']:.4f} |")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'pool': args.pool, 'pairs': [k for k, *_ in val], 'rows': [{'name': n, **m} for n, m in rows]},
                      f, indent=1)


if __name__ == '__main__':
    main()

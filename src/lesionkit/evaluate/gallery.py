"""The report's gallery: for each class, the image the network called that class most confidently and rightly,
and the one it called that class most confidently and wrongly, with where it looked (Grad-CAM of that class).

At most two maps per class, 14 for HAM10000, so the gallery costs seconds whatever the number of images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from lesionkit import LesionkitError
from lesionkit.data.clinical import known
from lesionkit.data.images import load_image
from lesionkit.files import atomic_write
from lesionkit.serve.explain import FAITHFULNESS, explain, network, target_layer

METHOD = "gradcam"
# Pictures at most this many pixels a side: 14 of them are embedded in report.html.
THUMBNAIL = 200


def pick(frame: pd.DataFrame, probabilities: np.ndarray, classes: list[str]) -> dict[str, dict[str, int]]:
    """Per predicted class, the row (position in ``frame``) of its most confident ``right`` and ``wrong`` call;
    a class the network never called (rightly or wrongly) has no entry for that kind."""
    predicted = probabilities.argmax(axis=1)
    truth = frame["dx"].to_numpy()
    chosen = {}
    for index, name in enumerate(classes):
        calls = predicted == index
        for kind, rows in (("right", calls & (truth == name)), ("wrong", calls & (truth != name))):
            if rows.any():
                positions = np.flatnonzero(rows)
                chosen.setdefault(name, {})[kind] = int(positions[probabilities[positions, index].argmax()])
    return chosen


def write_gallery(classifier, frame: pd.DataFrame, probabilities: np.ndarray, out_dir: Path) -> dict:
    """Write ``gallery_<class>_<right|wrong>.png`` into ``out_dir`` (beside the report, whose HTML embeds them)
    and return the report's ``gallery`` section.

    ``frame`` has ``image_id``, ``path`` and ``dx``, and for a model that reads clinical metadata its columns
    (each map runs with the image's known values, and its entry names them); ``probabilities`` are the evaluated
    ``(images, classes)`` probabilities in ``frame``'s row order: they choose the images and are the ones the
    captions show.
    """
    images = {}
    fields = classifier.encoding.fields if classifier.encoding else ()
    for name, kinds in pick(frame, probabilities, classifier.classes).items():
        for kind, position in kinds.items():
            row = frame.iloc[position]
            given = {f: row[f] for f in fields if f in row and known(row[f])}
            try:
                explanation = explain(classifier, load_image(Path(row["path"])), METHOD, name, given)
            except LesionkitError as err:  # evaluated a moment ago, so hardly ever; the report goes on without it
                images.setdefault(name, {})[kind] = {"image_id": row["image_id"], "error": str(err)}
                continue
            file = f"gallery_{name}_{kind}.png"
            picture = Image.fromarray(explanation.overlay)
            picture.thumbnail((THUMBNAIL, THUMBNAIL))
            atomic_write(out_dir / file, lambda tmp, picture=picture: picture.save(tmp, format="PNG"), "picture")
            images.setdefault(name, {})[kind] = {
                "file": file, "image_id": row["image_id"], "true": row["dx"], "predicted": name,
                "probability": float(probabilities[position, classifier.classes.index(name)]),
                "faithfulness": explanation.faithfulness, **({"metadata": given} if fields else {})}
    return {"method": METHOD, "layer": target_layer(network(classifier)), "faithfulness_metric": FAITHFULNESS,
            "images": images}

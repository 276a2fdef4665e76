"""What a front end shows of a prediction: the one adapter the desktop viewer and the web service use.

:class:`ShownPrediction` is a :class:`~histolens.inference.prediction.Prediction` in plain Python
values (a runtime may hand back numpy scalars) without the file path, which stays where the
image was read. It names the prediction's review state once, most serious first, so that the
viewer's badge, its results list and the web API's fields cannot disagree about it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

from histolens.inference.prediction import Prediction

__all__ = ["ShownPrediction"]

S = TypeVar("S", bound="ShownPrediction")


@dataclass
class ShownPrediction(Prediction):
    """A prediction as the front ends show it: plain values, no file path, its review state."""

    @classmethod
    def from_prediction(cls: type[S], prediction: Prediction, **extra: Any) -> S:
        """``prediction``'s shown values; ``extra`` fills the fields a subclass adds."""
        values = {f.name: getattr(prediction, f.name) for f in fields(Prediction)}
        values.update(
            probability=float(prediction.probability),
            scores=dict(prediction.scores),
            uncertain=bool(prediction.uncertain),
            path=None,
            prediction_set=tuple(prediction.prediction_set),
            refer=bool(prediction.refer),
            ood=bool(prediction.ood),
        )
        return cls(**values, **extra)

    @property
    def review(self) -> str:
        """Why a person should look, most serious first: 'ood' (not like the training images),
        'refer' (several classes plausible), 'review' (close to the boundary), or ''."""
        return "ood" if self.ood else "refer" if self.refer else "review" if self.uncertain else ""

    @property
    def flagged(self) -> bool:
        """A person should look: unlike the training images, referred, or close to the boundary."""
        return bool(self.review)

    @property
    def shown_probability(self) -> float:
        """The calibrated probability of the positive class (binary) or of the predicted class."""
        p = self.positive_probability
        return float(self.probability if p is None else p)

    def to_dict(self) -> dict[str, Any]:
        """The Prediction's fields but the path (the web API's prediction, before its model id)."""
        names = {f.name for f in fields(Prediction)} - {"path"}
        return {k: v for k, v in asdict(self).items() if k in names}

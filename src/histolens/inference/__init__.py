"""Running a trained model: predictor, runtimes, OOD guard, batch prediction.

Owns ``predictor`` (``Predictor``), ``loading`` (turning a checkpoint into a runnable model),
``runtimes`` (ONNX Runtime / OpenVINO / exported torch), ``ood`` (out-of-distribution guard),
``prediction`` (``Prediction``), ``shown`` (``ShownPrediction``: what the GUI and the web show of
one), ``predictions_csv`` and batch prediction (``batch``, ``progress``, ``resume``).
May import: everything below it (base, stats, data, stain, models, checkpoint).
"""

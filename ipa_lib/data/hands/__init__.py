"""Real hand detection and hand-quality gating (MediaPipe HandLandmarker).

- `model_file`: find/fetch/verify `hand_landmarker.task` (sha256-pinned).
- `landmarker`: `HandDetector` (IMAGE and VIDEO mode), `Hand` results in pixels.
- `layouts`:    driving-pose keypoint layouts -> MediaPipe (..., 2, 21, 3).
- `masks`:      hand masks from keypoints/detections, pixel grid -> Wan latent grid.
- `quality`:    `MediaPipeHandScorer`, the gate's real scorer.
- `detect`: detection over a batch of images and videos (`ipa hands detect`).

Submodules are imported on use: mediapipe and torch load only when needed.
"""

"""Layer 2, the data: the toy world and its hand scorer, tensors <-> clips, the clip store
(sharded npz + manifest), video I/O, real-video indexing, Great Expectations checks
(`checks`), strips and plots (`visualize`), and `hands/` (MediaPipe detection, keypoint
layouts, masks, scoring)."""

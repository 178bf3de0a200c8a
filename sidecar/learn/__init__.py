"""Online learning of length heads from live traffic (issue #14): record examples off the ingest
path, learn in a separate process, promote only better heads, hot-swap them into the sidecar.

The ingest path sees one narrow interface, `ExampleRecorder` (recorder.py); the sidecar owns one
`Learning` (serving.py: recorder + hot-swap watcher + learner supervisor + metrics)."""
from lenpred.sidecar.learn.config import LearnConfig
from lenpred.sidecar.learn.recorder import ExampleRecorder
from lenpred.sidecar.learn.serving import Learning

__all__ = ["LearnConfig", "ExampleRecorder", "Learning"]

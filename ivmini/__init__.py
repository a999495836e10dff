"""ivmini: a compact InternVideo2 (model, stages, data, distributed training). See README.md."""

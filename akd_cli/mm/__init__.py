"""The mmdet 2.x integration (layer 2): compat patches, the distiller, configs, training, launching,
evaluation and visualisation. Modules here import mmcv/mmdet; import them only where needed."""

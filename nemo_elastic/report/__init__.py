"""Reports: every table, JSON file and plot a command writes.

- `common`: JSON that survives NaN / inf, console and Markdown tables, number formats, the
  headless plot axes shared by every figure, the pretraining loss and budget plots;
- `main_job`: `report.md` and its plots of the main job (`nemo-elastic run`);
- `elastic`: the elastic run's plots (per-budget KD loss, router choices) and TensorBoard events;
- `importance`: `ranking.json` and the layer-importance plot of `prepare`.

Nothing here trains or evaluates: the modules only format what the jobs measured.
"""

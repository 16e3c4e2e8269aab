#!/usr/bin/env python
"""Compare feature-visualisation methods on the same targets and the same budget, as in the
VITAL paper's Table 1: a sweep of models x targets x methods x seeds, each run scored by

  accuracy         top-1 / top-5 of the visualised model on each FV
  judge            top-1 / top-5 of a second classifier (and CLIP zero-shot with --clip_judge)
  FID              FVs vs. real images of the same classes, on the judge's penultimate features
  logit AUC / MAD  the class logit on the FV against its values on the real images
  cost             seconds per step and per image

Methods: vital (sort matching + class term), vital_pure (class_weight 0), am_fft (Lucid-style
activation maximisation, FFT parameterisation), maco (phase only, fixed magnitude spectrum of
the class's real images); more as {"name": ..., "overrides": {...}} in the sweep file.

--mode inner: inner neurons instead (models x neurons of --layer x methods x seeds), scored by
AUC / MAD of the neuron's activation on the FV against its top --num_real real images of
--data_dir (paper appendix B.1); methods vital, vital_pure, am_fft, maco.

Each run is a normal run folder under OUT/<model>/<target>/<method>/seed<k>/ plus result.json.
Runs of one (model, method, seed) differ only in the target (inner mode: the neuron); --batch_size
of them (default 4; 1 = one at a time) are rendered together in one batched optimisation, with
the images of the runs one at a time up to float rounding. Such a batch is the unit of work.
Finished runs are skipped (resume; a partly finished batch renders only its missing runs).
--shard i/n splits the batches between processes or machines (a SLURM array: --shard
$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT); a final --report merges.

--launcher (pip install -e .[cluster]): local runs one batch after another here; ray runs each
batch as a Ray task (a local Ray, or --ray_address of a cluster; one GPU per task when the
cluster has GPUs; failed tasks retried --retries times); slurm submits one job array through
submitit (--slurm_partition, --slurm_time minutes per batch, --slurm_gpus, --slurm_cpus,
--slurm_parallel, --slurm_folder). At the time limit submitit requeues the job, which skips the
runs that finished; the same command run again does the same. The report is the same whichever
launcher ran the sweep.

Examples:
  python evaluate_fvis.py --json_cfg presets/eval_lite0.json
  python evaluate_fvis.py --json_cfg presets/eval_lite0.json --shard 0/2   # and 1/2
  python evaluate_fvis.py --json_cfg presets/eval_lite0.json --report
  python evaluate_fvis.py --json_cfg presets/eval_lite0.json --launcher ray   # local Ray
  python evaluate_fvis.py --json_cfg presets/eval_lite0.json --launcher slurm \\
      --slurm_partition gpu --slurm_time 120 --slurm_parallel 32
  python evaluate_fvis.py --json_cfg presets/eval_inner_lite0.json          # inner neurons
  python evaluate_fvis.py --targets espresso daisy --methods vital am_fft --seeds 0 1 \\
      --settings "steps_multires=[50,100],num_ref=12" --out_dir out_eval/small
"""
import sys

from vital.commands import vital_eval   # installed as `vital-eval`

if __name__ == "__main__":
    sys.exit(vital_eval())

"""Run folders: what a job writes where, and who may write it.

    run_dir.py        `RunDir`: a training run's paths, lock, summary and `finished()`; the one
                      place each file name of the layout is spelled
    main_job_dir.py   `MainJobDir`: the main job's stage outputs and `finished(stage)`
    lock.py           `OutputLock`: one writer per run folder (flock, released on SIGKILL)
    output_lock.py    the same for export / extract / import outputs; stale staging removed
    paths.py          `check_output_location`: an output never overlaps what a command reads
"""

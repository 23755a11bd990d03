#!/usr/bin/env bash
# device run: cuda tests, the 2048² job, adapters, VAE passes; everything tarred into $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
R=$OUT/r; mkdir -p $R
df -h . /tmp /dev/shm | tee $R/df.txt
( timeout 200 python3 -m pytest -m cuda -q -x -p no:cacheprovider tests 2>&1 | tail -25 ) | tee $R/cuda_tests.txt
timeout 60 python3 benchmarks/bench_vae_passes.py --output_dir $R/vae > $R/vae.txt 2>&1; tail -3 $R/vae.txt
( timeout 150 python3 benchmarks/bench_adapters.py --resolution 1024 --steps 2 --output_dir $R/adapters 2>&1 | tail -8 ) | tee $R/adapters.txt
timeout 230 python3 benchmarks/bench_job_memory.py --work_dir /dev/shm/jm --output_dir $R/j --jobs flux_2048 --timeout 170 2>&1 | tail -4
tail -c 4000 /dev/shm/jm/flux_2048.log > $R/flux_2048.log
tar czf $OUT/r.tgz -C $OUT r && rm -rf $R

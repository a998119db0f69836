# The `mbf continual` flags every sweep of the real suite shares (sourced by reports/sweep_paired.sh and
# reports/sweep_methods.sh, so their runs differ only where they say): the real suite, one thread per
# run, N_TRAIN training examples per task (240), STEPS optimizer steps of batch 8 per task (30),
# MAX_LENGTH tokens (128: the chat template's ~30 on top of the 96 the plain prompts had), the model's
# chat template, and a float32 base (--dtype auto would pick bfloat16 on a CPU with native bf16, e.g. AMX, and
# mix two bases within one paired comparison: every committed paired run trained on float32).
real_flags() {
  echo "--suite real --threads 1 --n-train ${N_TRAIN:-240} --max-steps ${STEPS:-30} --batch-size 8" \
    "--max-length ${MAX_LENGTH:-128} --prompt-format auto --dtype ${DTYPE:-float32}"
}

#!/usr/bin/env bash
# Federated vs pooled vs single-site pretraining at equal compute, judged by k-NN AUROC of the
# frozen encoder on each site's held-out labelled images (`radfm eval`).
#
# Two synthetic hospitals: north (a standard scanner) and south (a strongly shifted one). Every
# arm starts from the same base checkpoint. By default every arm runs the same number of
# optimizer steps in total (site-steps for the federation, so equal compute); `TOTAL` changes the
# other arms' steps. The arms: pooled central training on both sites' images in one place;
# each site alone; federated FedAvg rounds through an exchange folder with the real `radfm
# federate` commands (publish, fetch, local training, contribute, aggregate, register).
# Prints a table per seed, the means over seeds, and ends with
# `bench: federated ratio=<federated AUROC / pooled AUROC>` (means over seeds).
set -euo pipefail

ROUNDS=${ROUNDS:-5}
LOCAL_STEPS=${LOCAL_STEPS:-30}
SAMPLES=${SAMPLES:-600}
SIZE=${SIZE:-32}
EVAL_SAMPLES=${EVAL_SAMPLES:-800}
PREVALENCE=${PREVALENCE:-0.4}
# Each seed draws other cohorts and trains with other masks and data orders; the summary
# averages over them (one seed's ranking is noisy at this scale).
SEEDS=${SEEDS:-0 1 2}
# federation: one warm-up and cosine decay across all rounds (what a FederatedSite does);
# per-round: every local job restarts its own (the comparison).
SCHEDULE=${SCHEDULE:-federation}
BIN=${BIN:-target/release}
ROOT=${OUT:-/tmp/radfm-bench-federated}
SITES=(north south)
# Steps of each non-federated arm; by default the federation's total site-steps (equal compute).
# TOTAL=ROUNDS×LOCAL_STEPS instead gives each arm as many steps as each site runs.
TOTAL=${TOTAL:-$((ROUNDS * LOCAL_STEPS * ${#SITES[@]}))}

rm -rf "$ROOT" && mkdir -p "$ROOT"
radfm() { "$BIN/radfm" "$@"; }

synth() { # out sites samples seed [shift]
  local extra=()
  [ -n "${5:-}" ] && extra=(--shift-site "$5")
  radfm synth --out "file://$OUT/$1" --sites "$2" --samples "$3" --seed $(($4 + 100 * SEED)) --size "$SIZE" \
    --lesion-radius 0.15,0.25 --lesion-prevalence "$PREVALENCE" --shard-mib 1 "${extra[@]}" >/dev/null
}

train() { # dataset checkpoint steps [initFrom [scheduleStart scheduleTotal]]
  local job=$JOB
  if [ -n "${4:-}" ]; then
    job="$OUT/job-$(basename "$2").yaml"
    sed "s|    patchSize: 8|    patchSize: 8\n    initFrom: $4|" "$JOB" >"$job"
  fi
  if [ -n "${5:-}" ]; then # one window of the federation's learning-rate schedule
    sed -i "s|    warmupSteps: 20|    warmupSteps: 20\n    schedule: {startStep: $5, totalSteps: $6}|" "$job"
  fi
  radfm run "$job" --workers 1 --steps "$3" --dataset "file://$OUT/$1" \
    --checkpoint "file://$OUT/$2" --quiet >/dev/null
}

auroc() { # export folder, site, [encoder: pretrained or random_init]
  radfm eval --model "file://$OUT/$1" --dataset "file://$OUT/eval-$2" --json |
    jq -r ".${3:-pretrained}.knn.auroc"
}

one_seed() { # seed: trains every arm on its own cohorts and appends "seed arm mean" to means.tsv
  SEED=$1
  OUT="$ROOT/seed-$SEED"
  mkdir -p "$OUT"
  JOB="$OUT/job.yaml"
  sed -e "s|imageSize: 64|imageSize: $SIZE|" -e "s|    warmupSteps: 20|    warmupSteps: 20\n    seed: $SEED|" \
    manifests/samples/trainingjob-local.yaml >"$JOB"
  echo "seed $SEED:"
  synth cohort-north north "$SAMPLES" 1
  synth cohort-south south "$SAMPLES" 2 south
  synth cohort-pooled north,south $((2 * SAMPLES)) 3 south
  synth eval-north north "$EVAL_SAMPLES" 11
  synth eval-south south "$EVAL_SAMPLES" 12 south
  synth cohort-base north,south 64 4 south

  start=$(date +%s)
  train cohort-base base 1
  base="file://$OUT/base"

  for arm in pooled north south; do
    train "cohort-$arm" "ckpt-$arm" "$TOTAL" "$base"
    radfm export "file://$OUT/ckpt-$arm" "file://$OUT/export-$arm" >/dev/null
  done

  # The federation: hub and sites share only the exchange folder.
  for who in hub "${SITES[@]}"; do
    radfm keygen --out "$OUT/keys" --site "$who" >"$OUT/keys-$who.pub"
  done
  EX=(--exchange "file://$OUT/exchange" --federation bench/federated)
  SCHED=(--last-round "$ROUNDS" --local-steps "$LOCAL_STEPS" --norm-bound 1000)
  radfm federate publish "${EX[@]}" "${SCHED[@]}" --model "$base" --key-file "$OUT/keys/hub.key" >/dev/null
  hub_key=$(cat "$OUT/keys-hub.pub")
  site_args=()
  for s in "${SITES[@]}"; do site_args+=(--site "$s=$(cat "$OUT/keys-$s.pub")"); done
  bytes=0
  for r in $(seq 1 "$ROUNDS"); do
    window=()
    [ "$SCHEDULE" = federation ] && window=($(((r - 1) * LOCAL_STEPS)) $((ROUNDS * LOCAL_STEPS)))
    for s in "${SITES[@]}"; do
      radfm federate fetch "${EX[@]}" --round "$r" --hub-key "$hub_key" \
        --out "$OUT/$s-global-$r.safetensors" >/dev/null
      train "cohort-$s" "fed-$s-$r" "$LOCAL_STEPS" "file://$OUT/$s-global-$r.safetensors" \
        "${window[@]}"
      sent=$(radfm federate contribute "${EX[@]}" --round "$r" --hub-key "$hub_key" --site "$s" \
        --key-file "$OUT/keys/$s.key" --local "file://$OUT/fed-$s-$r" | jq -r .bytesSent)
      bytes=$((bytes + sent))
    done
    radfm federate aggregate "${EX[@]}" "${SCHED[@]}" --round "$r" --min-sites 2 \
      "${site_args[@]}" --key-file "$OUT/keys/hub.key" >/dev/null
  done
  radfm federate register "${EX[@]}" --hub-key "$hub_key" --last-round "$ROUNDS" --base "$base" \
    --out "file://$OUT/export-federated" --registry "file://$OUT/registry" --model bench >/dev/null
  elapsed=$(($(date +%s) - start))

  printf '%-11s %12s %12s %12s\n' arm "AUROC north" "AUROC south" mean
  local n s m
  for arm in pooled federated north south random-init; do
    if [ "$arm" = random-init ]; then
      n=$(auroc export-pooled north random_init)
      s=$(auroc export-pooled south random_init)
    else
      n=$(auroc "export-$arm" north)
      s=$(auroc "export-$arm" south)
    fi
    m=$(jq -n "($n + $s) / 2")
    printf '%-11s %12.3f %12.3f %12.3f\n' "$arm" "$n" "$s" "$m"
    echo "$SEED $arm $m" >>"$ROOT/means.tsv"
  done
  echo "bytes sent per site per round: $((bytes / ROUNDS / ${#SITES[@]})); training wall time ${elapsed}s"
}

echo "data: ${SITES[*]} ($SAMPLES training images each; south's scanner shifted), $TOTAL steps per arm," \
  "$SCHEDULE learning-rate schedule, seeds: $SEEDS"
for seed in $SEEDS; do one_seed "$seed"; done

echo "mean over seeds (and seeds where the federation scored higher):"
for arm in pooled federated north south random-init; do
  awk -v arm="$arm" '
    $2 == "federated" { fed[$1] = $3 }
    $2 == arm { sum += $3; n++; v[$1] = $3 }
    END {
      for (s in v) if (fed[s] > v[s]) wins++
      if (arm == "federated") printf "%-11s %6.3f\n", arm, sum / n
      else printf "%-11s %6.3f  (%d of %d)\n", arm, sum / n, wins, n
    }' "$ROOT/means.tsv"
done
ratio=$(awk '$2 == "federated" { f += $3 } $2 == "pooled" { p += $3 } END { printf "%.3f", f / p }' \
  "$ROOT/means.tsv")
echo "bench: federated ratio=$ratio"

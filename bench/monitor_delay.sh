#!/usr/bin/env bash
# Detection delay and false alarms of site monitoring (`radfm monitor`), over seeds.
#
# Three hospitals watch the same production model with one look a week for WEEKS weeks. South and
# east never change. North replaces its scanner gradually from week SHIFT_WEEK: that week 1/RAMP
# of its cases come from the older, noisier scanner (`radfm synth --shift-site`), then 2/RAMP,
# and so on until all of them (RAMP=4: a quarter, a half, ...; RAMP=8: a subtler drift, an eighth
# the first week). Every look compares the week's WINDOW cases with the
# site's reference window (the cases the model was validated on) at the deployed level α.
#
# Two arms: "metadata" watches embeddings, the probe's scores, scanner and sex; "images" watches
# only embeddings, the probe's scores and sex, as a site whose new scanner reports the old
# manufacturer would. Prints every look, then per arm: the detection delay in looks (0 = flagged
# at the first shifted week) per seed, and the false alarms among the unchanged windows (south,
# east, and north before the shift) against the α × looks expected, for the drift statistics and,
# since every window carries its labels, for the late-label performance statistics (each family
# is adjusted apart at α). Ends with `bench: monitor ratio=<false alarms / expected false alarms>`
# over both arms and both families.
set -euo pipefail

SEEDS=${SEEDS:-0 1 2}
WEEKS=${WEEKS:-8}
SHIFT_WEEK=${SHIFT_WEEK:-4}
RAMP=${RAMP:-4}
WINDOW=${WINDOW:-120}
REFERENCE=${REFERENCE:-240}
SIZE=${SIZE:-32}
STEPS=${STEPS:-60}
ALPHA=${ALPHA:-0.01}
BIN=${BIN:-target/release}
ROOT=${OUT:-/tmp/radfm-bench-monitor}
SITES=(north south east)

rm -rf "$ROOT" && mkdir -p "$ROOT"
radfm() { "$BIN/radfm" "$@"; }

synth() { # out site samples seed first-index [shift]
  local extra=()
  [ -n "${6:-}" ] && extra=(--shift-site "$2")
  radfm synth --out "file://$OUT/$1" --sites "$2" --samples "$3" --seed "$4" --size "$SIZE" \
    --first-index "$5" --lesion-radius 0.15,0.25 --lesion-prevalence 0.4 --shard-mib 0.25 \
    "${extra[@]}" >/dev/null
}

# How many RAMP-ths of north's cases come from the new scanner in week $1.
steps() {
  local q=$(($1 - SHIFT_WEEK + 1))
  if [ "$q" -lt 0 ]; then q=0; fi
  if [ "$q" -gt "$RAMP" ]; then q=$RAMP; fi
  echo "$q"
}

one_seed() {
  SEED=$1
  OUT="$ROOT/seed-$SEED"
  mkdir -p "$OUT/keys"
  local base=$((1000 * SEED))
  sed -e "s|imageSize: 64|imageSize: $SIZE|" -e "s|    warmupSteps: 20|    warmupSteps: 5\n    seed: $SEED|" \
    manifests/samples/trainingjob-local.yaml >"$OUT/job.yaml"
  for i in "${!SITES[@]}"; do
    synth "reference-${SITES[$i]}" "${SITES[$i]}" "$REFERENCE" $((base + i)) 0
  done
  synth pool north "$REFERENCE" $((base + 10)) 0
  synth pool south "$REFERENCE" $((base + 11)) "$REFERENCE"
  synth pool east "$REFERENCE" $((base + 12)) $((2 * REFERENCE))
  radfm run "$OUT/job.yaml" --workers 1 --steps "$STEPS" --dataset "file://$OUT/pool" \
    --checkpoint "file://$OUT/ckpt" --quiet >/dev/null
  radfm export "file://$OUT/ckpt" "file://$OUT/model" >/dev/null
  radfm registry register "file://$OUT/registry" chest --export "file://$OUT/model" >/dev/null
  radfm registry promote "file://$OUT/registry" chest 1 --reason validated >/dev/null
  for site in "${SITES[@]}"; do
    radfm keygen --out "$OUT/keys" --site "$site" >/dev/null
  done
  for week in $(seq 1 "$WEEKS"); do
    for i in "${!SITES[@]}"; do
      local site=${SITES[$i]} new=0
      [ "$site" = north ] && new=$(($(steps "$week") * WINDOW / RAMP))
      local old=$((WINDOW - new)) dir="week-$week-$site" seed=$((base + 100 * week + i))
      [ "$old" -gt 0 ] && synth "$dir" "$site" "$old" "$seed" 0
      [ "$new" -gt 0 ] && synth "$dir" "$site" "$new" $((seed + 50)) "$old" shift
      for arm in metadata images; do
        local fields=manufacturer,sex
        [ "$arm" = images ] && fields=sex
        local flagged
        flagged=$(radfm monitor --registry "file://$OUT/registry" --model chest --site "$site" \
          --key-file "$OUT/keys/$site.key" --reference "file://$OUT/reference-$site" \
          --recent "file://$OUT/$dir" --task lesion --fields "$fields" --alpha "$ALPHA" \
          --seed "$((SEED * 100 + week))" --json |
          jq -r '[.watched[] | select(.drifting) | .name] | join(",")')
        local shifted=0
        [ "$new" -gt 0 ] && shifted=1
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$SEED" "$arm" "$week" "$site" "$shifted" "${flagged:--}" |
          tee -a "$ROOT/looks.tsv"
      done
    done
  done
}

echo -e "seed\tarm\tweek\tsite\tshifted\tflagged statistics"
for s in $SEEDS; do one_seed "$s"; done

awk -F'\t' -v alpha="$ALPHA" -v shift_week="$SHIFT_WEEK" '
  # Flagged statistics split into the drift family and the performance family (late labels).
  function family(list, want,    n, i, names, out) {
    n = split(list, names, ","); out = 0
    for (i = 1; i <= n; i++) {
      if (names[i] == "-") continue
      if ((names[i] ~ /^performance:/) == (want == "performance")) out = 1
    }
    return out
  }
  {
    key = $2
    if ($5 == 0) {
      clean[key]++
      fa_drift[key] += family($6, "drift")
      fa_perf[key] += family($6, "performance")
    }
    if ($5 == 1) { shifted[key]++; perf_shifted[key] += family($6, "performance") }
    if ($5 == 1 && $6 != "-" && !((key, $1) in first)) first[key, $1] = $3 - shift_week
    seeds[$1] = 1; arms[key] = 1
  }
  END {
    printf "\narm       delay per seed (looks after the shift began)   false alarms / unchanged looks: drift, performance (expected at alpha each)   performance flagged / shifted looks\n"
    total_fa = 0; total_expected = 0
    for (a in arms) {
      line = ""
      for (s in seeds) line = line sprintf(" %s", ((a, s) in first) ? first[a, s] : "missed")
      expected = alpha * clean[a]
      printf "%-9s %-47s %d, %d / %d (%.2f each)   %d / %d\n", a, line, fa_drift[a] + 0, fa_perf[a] + 0, clean[a], expected, perf_shifted[a] + 0, shifted[a]
      total_fa += fa_drift[a] + fa_perf[a]; total_expected += 2 * expected
    }
    printf "bench: monitor ratio=%.3f\n", (total_fa + 0) / total_expected
  }' "$ROOT/looks.tsv"

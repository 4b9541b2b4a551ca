#!/usr/bin/env bash
# Detection delay and false alarms of site monitoring (`radfm monitor`), over seeds.
#
# Three hospitals watch the same production model with one look a week for WEEKS weeks. South and
# east never change. North replaces its scanner gradually from week SHIFT_WEEK: that week a
# quarter of its cases come from the older, noisier scanner (`radfm synth --shift-site`), then a
# half, three quarters, and all of them. Every look compares the week's WINDOW cases with the
# site's reference window (the cases the model was validated on) at the deployed level α.
#
# Two arms: "metadata" watches embeddings, the probe's scores, scanner and sex; "images" watches
# only embeddings, the probe's scores and sex, as a site whose new scanner reports the old
# manufacturer would. Prints every look, then per arm: the detection delay in looks (0 = flagged
# at the first shifted week) per seed, and the false alarms among the unchanged windows (south,
# east, and north before the shift) against the α × looks expected. Ends with
# `bench: monitor ratio=<false alarms / expected false alarms>` over both arms.
set -euo pipefail

SEEDS=${SEEDS:-0 1 2}
WEEKS=${WEEKS:-8}
SHIFT_WEEK=${SHIFT_WEEK:-4}
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

# The fraction of north's cases from the new scanner in week $1, in quarters.
quarters() {
  local q=$(($1 - SHIFT_WEEK + 1))
  if [ "$q" -lt 0 ]; then q=0; fi
  if [ "$q" -gt 4 ]; then q=4; fi
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
      [ "$site" = north ] && new=$(($(quarters "$week") * WINDOW / 4))
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
  {
    key = $2
    if ($5 == 0) { clean[key]++; if ($6 != "-") fa[key]++ }
    if ($5 == 1 && $6 != "-" && !((key, $1) in first)) first[key, $1] = $3 - shift_week
    seeds[$1] = 1; arms[key] = 1
  }
  END {
    printf "\narm       delay per seed (looks after the shift began)   false alarms / unchanged looks (expected at alpha)\n"
    total_fa = 0; total_expected = 0
    for (a in arms) {
      line = ""
      for (s in seeds) line = line sprintf(" %s", ((a, s) in first) ? first[a, s] : "missed")
      expected = alpha * clean[a]
      printf "%-9s %-47s %d / %d (%.2f)\n", a, line, fa[a] + 0, clean[a], expected
      total_fa += fa[a]; total_expected += expected
    }
    printf "bench: monitor ratio=%.3f\n", (total_fa + 0) / total_expected
  }' "$ROOT/looks.tsv"

#!/usr/bin/env bash
# Semantic Genesis quickstart: the whole pipeline on embedded default data, then a summary of
# what the run established.
#
#   prepare -> autoencoder -> features -> anatomical patterns -> pretraining
#   -> fine-tune twice, pretrained and from scratch (same cubes, split and seed) -> summary
#
# Data: the two real chest CTs of the pyradiomics 3.0.1 sdist (scripts/fetch_sample_ct.py)
# plus procedural phantom patients (scripts/phantoms.py): the pattern generator needs at least
# --nb_instances train patients, and two scans are not enough. Without network access the
# run uses phantoms only, and says so. --input_dir uses your own scans instead.
#
# The summary (scripts/quickstart_summary.py) prints the pretext self-classification top-1
# against chance, the restoration gain per transformation, a linear probe of the frozen
# encoder before and after pretraining, the two fine-tunes side by side with their test AUC
# and its standard error, and where the montages, TensorBoard curves and checkpoints are.
#
# Default (quick): small settings for a CPU (width 8, autoencoder input 64x64x32, cubes
# 32x32x16, 6 classes x 8 instances, 12 phantom patients; 6 autoencoder, 8 pretraining and 6
# fine-tuning epochs; nodule / no-nodule cubes of 32x32x16: 96 to fine-tune on, 96 to test;
# --epochs sets every stage's epochs). --full: the published sizes (width 32, 128x128x64
# autoencoder input, 64x64x32 cubes, 44 classes, batch 64, published early stopping) -- for a
# GPU. --no_finetune stops after the pretraining (the summary still reports it).
# Measured (quick, --no_real, --device cpu): 140 s on an idle 2-core AMD EPYC VM; 34 min on the
# same VM shared with jobs keeping its load average at 8-10.
#
# Usage: bash scripts/quickstart.sh [--full] [--out DIR] [--input_dir DIR] [--phantoms N]
#                                   [--no_real] [--epochs N] [--device auto|cpu|cuda]
#                                   [--no_finetune] [--dry_run]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."          # repository root, from any working directory
REPO="$(pwd)"
PY="${PYTHON:-python}"

MODE=quick
OUT=outputs/quickstart
INPUT_DIR=""
N_PHANTOMS=""
USE_REAL=1
EPOCHS=""
DEVICE=auto
DRY=0
FINETUNE=1

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --full) MODE=full ;;
    --out) OUT="$2"; shift ;;
    --input_dir) INPUT_DIR="$2"; shift ;;
    --phantoms) N_PHANTOMS="$2"; shift ;;
    --no_real) USE_REAL=0 ;;
    --epochs) EPOCHS="$2"; shift ;;
    --device) DEVICE="$2"; shift ;;
    --dry_run) DRY=1 ;;
    --no_finetune) FINETUNE=0 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [[ $MODE == quick ]]; then
  SPACING=(1.5 1.5 3.0)       # mm; phantoms are generated on this grid
  PH_SHAPE=(192 192 80)
  AE_SIZE=(64 64 32); WIDTH=8; AE_BATCH=4
  CUBE=(32 32 16); PATCH_MIN=25; PATCH_MAX=40
  CLASSES=6; INSTANCES=8; INSTANCES_VAL=3; BORDER=40; BORDER_Z=4
  BATCH=8; FT_BATCH=8; FT_CUBES=96; TEST_CUBES=96
  # at 32x32x16 the default nodules (radius 2-2.7 voxels) hide among vessels: 2-4 voxels
  FT_CUBE=(32 32 16); FT_RADIUS=(--nodule_radius 2 4); FT_OPT=(--optimizer adam --lr 1e-3)
  : "${N_PHANTOMS:=12}"
  AE_EPOCHS="${EPOCHS:-6}"; PT_EPOCHS="${EPOCHS:-8}"
  AE_EPOCH=(--nb_epoch "$AE_EPOCHS"); PT_EPOCH=(--nb_epoch "$PT_EPOCHS")
  FT_EPOCH=(--nb_epoch "${EPOCHS:-6}")
  PROBE_EVERY=$PT_EPOCHS      # the probe before the first epoch and after the last
else
  SPACING=(1.0 1.0 2.5)
  PH_SHAPE=(320 320 112)
  AE_SIZE=(128 128 64); WIDTH=32; AE_BATCH=8
  CUBE=(64 64 32); PATCH_MIN=50; PATCH_MAX=80
  CLASSES=44; INSTANCES=200; INSTANCES_VAL=30; BORDER=60; BORDER_Z=10
  BATCH=64; FT_BATCH=16; FT_CUBES=400; TEST_CUBES=200
  FT_CUBE=(64 64 32); FT_RADIUS=(); FT_OPT=()
  : "${N_PHANTOMS:=60}"
  if [[ -n $EPOCHS ]]; then
    AE_EPOCH=(--nb_epoch "$EPOCHS"); PT_EPOCH=(--nb_epoch "$EPOCHS"); FT_EPOCH=(--nb_epoch "$EPOCHS")
  else                        # published schedules: early stopping ends them
    AE_EPOCH=(); PT_EPOCH=(); FT_EPOCH=()
  fi
  PROBE_EVERY=10
fi

# folder names: runtime/pipeline_summary.py (QuickstartLayout) reads the same ones
IN="$OUT/input"; DS="$OUT/dataset"; AE="$OUT/autoencoder"; FEAT="$OUT/features"
PAT="$OUT/patterns"; PRE="$OUT/pretrain"; NOD="$OUT/nodule_cubes"; RUNS="$OUT/runs"
FT_PRE="$OUT/finetune_pretrained"; FT_SCR="$OUT/finetune_scratch"

run() {  # run NAME CMD...: print the command, run it, time it
  local name="$1"; shift
  printf '==> [%s] ' "$name"; printf '%q ' "$@"; printf '\n'
  [[ $DRY == 1 ]] && return 0
  local t0=$SECONDS
  "$@"
  echo "    [$name] done in $((SECONDS - t0)) s"
}

START=$SECONDS
echo "Semantic Genesis quickstart ($MODE mode) -> $OUT"
[[ $DRY == 1 ]] || mkdir -p "$OUT"

# ---- 0. data ---------------------------------------------------------------------------
SOURCES=()
if [[ -n $INPUT_DIR ]]; then
  SOURCES+=("$INPUT_DIR")
  echo "data: your scans in $INPUT_DIR"
else
  if [[ $USE_REAL == 1 ]]; then
    if [[ $DRY == 1 ]] || $PY scripts/fetch_sample_ct.py --quiet --timeout 180 --images_only "$IN/sample_ct" >/dev/null; then
      echo "data: 2 real chest CTs (pyradiomics 3.0.1 sample data) + $N_PHANTOMS phantom patients"
      SOURCES+=("$IN/sample_ct")
    else
      echo "data: the sample CTs could not be fetched (no access to the package index?):" \
           "using $N_PHANTOMS phantom patients only"
    fi
  else
    echo "data: $N_PHANTOMS phantom patients only (--no_real)"
  fi
  run phantoms "$PY" scripts/phantoms.py --output_dir "$IN/phantoms" --n "$N_PHANTOMS" \
      --shape "${PH_SHAPE[@]}" --spacing "${SPACING[@]}" --format nrrd --seed 100 --skip_existing
  SOURCES+=("$IN/phantoms")
fi

# ---- 1. prepare: HU -> [0, 1] .npy per patient, train/validation split ---------------------
run prepare "$PY" scripts/prepare_dataset.py --input_dir "${SOURCES[@]}" --output_dir "$DS" \
    --spacing "${SPACING[@]}" --val_fraction 0.25 --seed 0

# ---- 2. autoencoder on whole volumes -------------------------------------------------------
run autoencoder "$PY" self_discovery/train_autoencoder.py --data_dir "$DS" \
    --input_rows "${AE_SIZE[0]}" --input_cols "${AE_SIZE[1]}" --input_deps "${AE_SIZE[2]}" \
    --width "$WIDTH" --batch_size "$AE_BATCH" "${AE_EPOCH[@]}" --num_workers 0 --cache \
    --device "$DEVICE" --output_dir "$AE" --log_dir "$RUNS/autoencoder" --overwrite

# ---- 3. one feature vector per patient -----------------------------------------------------
run features "$PY" self_discovery/feature_extractor.py --data_dir "$DS" \
    --weights "$AE/Unet_autoencoder.pt" \
    --input_rows "${AE_SIZE[0]}" --input_cols "${AE_SIZE[1]}" --input_deps "${AE_SIZE[2]}" \
    --num_workers 0 --device "$DEVICE" --output_dir "$FEAT" --overwrite

# ---- 4. self-discovery of anatomical patterns ----------------------------------------------
N_TRAIN=$([[ $DRY == 1 ]] && echo 999 || find "$DS/train" -name '*.npy' | wc -l)
N_VAL=$([[ $DRY == 1 ]] && echo 999 || find "$DS/validation" -name '*.npy' | wc -l)
(( INSTANCES > N_TRAIN )) && { echo "note: $N_TRAIN train patients: --nb_instances $N_TRAIN instead of $INSTANCES"; INSTANCES=$N_TRAIN; }
(( INSTANCES_VAL > N_VAL )) && { echo "note: $N_VAL validation patients: --nb_instances_val $N_VAL"; INSTANCES_VAL=$N_VAL; }
(( CLASSES > N_TRAIN )) && { echo "note: $N_TRAIN train patients: --nb_classes $N_TRAIN instead of $CLASSES"; CLASSES=$N_TRAIN; }
run patterns "$PY" self_discovery/pattern_generator_3D.py --data_dir "$DS" --output_dir "$PAT" \
    --train_features "$FEAT/train_features.npy" --val_features "$FEAT/validation_features.npy" \
    --is_normalized --input_rows "${CUBE[0]}" --input_cols "${CUBE[1]}" --input_deps "${CUBE[2]}" \
    --crop_rows "${CUBE[0]}" --crop_cols "${CUBE[1]}" --multi_res \
    --minPatchSize "$PATCH_MIN" --maxPatchSize "$PATCH_MAX" --nb_classes "$CLASSES" \
    --nb_instances "$INSTANCES" --nb_instances_val "$INSTANCES_VAL" \
    --len_border "$BORDER" --len_border_z "$BORDER_Z" --seed 0 --overwrite

# ---- 5. target-task cubes (nodule / no nodule) from other phantom patients ------------------
# the fine-tuning set doubles as the probe set of the pretraining; the test set is apart
run nodule_cubes "$PY" scripts/phantoms.py --output_dir "$NOD/train" --nodule_cubes "$FT_CUBES" \
    --cube_size "${FT_CUBE[@]}" "${FT_RADIUS[@]}" --seed 7
run test_cubes "$PY" scripts/phantoms.py --output_dir "$NOD/test" --nodule_cubes "$TEST_CUBES" \
    --cube_size "${FT_CUBE[@]}" "${FT_RADIUS[@]}" --seed 8

# ---- 6. pretraining: self-classification + self-restoration (Y-Net 3D) ----------------------
# cube size, classes, instances and resolutions: from the pattern generator's $PAT/config.json
run pretrain "$PY" pytorch/train.py --data_dir "$PAT" \
    --width "$WIDTH" --batch_size "$BATCH" "${PT_EPOCH[@]}" \
    --probe_data "$NOD/train/cubes.npy" --probe_labels "$NOD/train/labels.npy" \
    --probe_every "$PROBE_EVERY" \
    --device "$DEVICE" --output_dir "$PRE" --log_dir "$RUNS" --notes quickstart --overwrite

# ---- 7. fine-tune the same cubes twice: pretrained encoder, then from scratch ---------------
if [[ $FINETUNE == 1 ]]; then
  FT_COMMON=(--data "$NOD/train/cubes.npy" --labels "$NOD/train/labels.npy" --val_fraction 0.25
             --test_data "$NOD/test/cubes.npy" --test_labels "$NOD/test/labels.npy"
             --width "$WIDTH" --batch_size "$FT_BATCH" "${FT_EPOCH[@]}" "${FT_OPT[@]}" --seed 0
             --num_workers 0 --device "$DEVICE" --overwrite)
  run finetune_pretrained "$PY" scripts/finetune_classification.py "${FT_COMMON[@]}" \
      --weights "$PRE/semantic_genesis_chest_ct.pt" --output_dir "$FT_PRE"
  run finetune_scratch "$PY" scripts/finetune_classification.py "${FT_COMMON[@]}" \
      --output_dir "$FT_SCR"
else
  [[ $DRY == 1 ]] || rm -rf "$FT_PRE" "$FT_SCR"   # no stale fine-tunes in the summary
fi

# ---- 8. what the run established -------------------------------------------------------------
[[ $DRY == 1 ]] && { run summary "$PY" scripts/quickstart_summary.py --out "$OUT"; exit 0; }
echo
echo "Quickstart finished in $((SECONDS - START)) s ($MODE mode); outputs in $OUT"
echo "  (input volumes $IN, prepared dataset $DS, features $FEAT, pattern cubes $PAT, target cubes $NOD)"
echo
"$PY" scripts/quickstart_summary.py --out "$OUT"

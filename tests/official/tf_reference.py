"""The official DELF v1 network and extraction in TensorFlow, for the converter's tests.

Runs in its own environment (tests/official/requirements.txt: TensorFlow 2.12 with tf-slim 1.1.0
and numpy < 2, which this project's environment cannot hold), as a subprocess of
tests/test_official.py. It

1. builds the official network in a TF1 graph: tf_slim's ``resnet_v1`` with the three blocks of
   ``resnet_v1_50`` (as ``delf_v1.py``'s ``GetResnet50Subnetwork``), under
   ``resnet_v1.resnet_arg_scope()`` in inference mode, and the attention block as ``delf_v1.py``
   defines it (``attention_block/attention/compute``: conv1 1x1 512 with BatchNorm and ReLU,
   conv2 1x1 1 with bias, softplus), plus a training classifier and ``global_step`` that a converter
   must ignore;
2. gives every variable random, non-trivial values (BatchNorm scales, offsets and moving statistics
   included) and saves a TF1 SavedModel and random PCA ``.datum`` files in the released layout;
3. extracts features of the given images as the official ``feature_extractor.py`` and
   ``extractor.py`` do: pixels (x - 128) / 128; per scale ``resize_bilinear`` (no half-pixel
   centres) to round(side * scale); receptive boxes 32 * [i, j, i, j] + [-145, -145, 145, 145],
   divided by the scale; cells with attention >= the threshold, all scales together;
   ``tf.image.non_max_suppression`` (IoU 1.0) keeps the best ``max_feature_num``; descriptors L2 ->
   PCA (first ``pca_dim`` rows) -> L2; locations are the boxes' centres (y, x);
4. optionally saves a release of another model (TF2 DELG-like variable names) and the same network
   with unfused BatchNorms (no FusedBatchNorm node), for the converter's checks.

Usage (PYTHONPATH=<project root>):
    python tests/official/tf_reference.py --release DIR --images a.npy b.npy --out ref.npz [--unknown_release DIR2]
        [--unfused_release DIR3]
"""
from __future__ import annotations

import argparse
import os
import shutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tf_slim import layers  # noqa: E402
from tf_slim.nets import resnet_v1  # noqa: E402
from tf_slim.ops.arg_scope import arg_scope  # noqa: E402

from tests.official.datum_proto import datum_bytes  # noqa: E402  (run with the project root on PYTHONPATH)

RF, STRIDE, PADDING = 291.0, 32.0, 145.0  # the official block3 constants
SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)


def write_datum(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        f.write(datum_bytes(array))


def network(images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(block3 features, attention) of normalised images, as delf_v1.GetAttentionPrelogit."""
    block = resnet_v1.resnet_v1_block
    blocks = [block("block1", base_depth=64, num_units=3, stride=2),
              block("block2", base_depth=128, num_units=4, stride=2),
              block("block3", base_depth=256, num_units=6, stride=2)]
    with arg_scope(resnet_v1.resnet_arg_scope()):
        _, end_points = resnet_v1.resnet_v1(images, blocks, is_training=False, global_pool=False,
                                            scope="resnet_v1_50")
    features = end_points["resnet_v1_50/block3"]
    with arg_scope(resnet_v1.resnet_arg_scope()), arg_scope([layers.batch_norm], is_training=False):
        with tf.compat.v1.variable_scope("attention_block"):
            with tf.compat.v1.variable_scope("attention"), tf.compat.v1.variable_scope("compute"):
                hidden = layers.conv2d(features, 512, 1, scope="conv1")
                score = layers.conv2d(hidden, 1, 1, activation_fn=None, normalizer_fn=None, scope="conv2")
            pooled = tf.reduce_mean(tf.nn.l2_normalize(features, 3) * tf.nn.softplus(score), [1, 2], keepdims=True)
            layers.conv2d(pooled, 7, 1, activation_fn=None, normalizer_fn=None, scope="logits")  # training only
    return features, tf.nn.softplus(score)


def randomise(sess: tf.compat.v1.Session, rng: np.random.Generator) -> None:
    """Random values for every variable: He-scaled kernels, BatchNorm gamma in [0.5, 1.5], beta and
    moving means ~ N(0, 0.1), moving variances in [0.5, 2]."""
    for var in tf.compat.v1.global_variables():
        shape, name = var.shape.as_list(), var.op.name
        if name.endswith("weights"):
            value = rng.normal(0, np.sqrt(2.0 / np.prod(shape[:3])), shape)
        elif name.endswith("gamma"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name.endswith("moving_variance"):
            value = rng.uniform(0.5, 2.0, shape)
        elif name.endswith(("beta", "moving_mean", "biases")):
            value = rng.normal(0, 0.1, shape)
        else:
            continue
        var.load(value.astype(np.float32), sess)


def save_unknown_release(folder: str) -> None:
    """A SavedModel whose variables are not DELF v1's (named like a TF2 DELG model's), with PCA files."""
    with tf.Graph().as_default():
        for name, shape in (("model/backbone/conv1/kernel", [7, 7, 3, 64]), ("model/attention/conv1/kernel",
                                                                              [1, 1, 1024, 512])):
            tf.compat.v1.get_variable(name, shape)
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            builder = tf.compat.v1.saved_model.Builder(os.path.join(folder, "model"))
            builder.add_meta_graph_and_variables(sess, [tf.compat.v1.saved_model.tag_constants.SERVING])
            builder.save()


def save_unfused_release(folder: str, pca_folder: str) -> None:
    """The same network built with TF's unfused BatchNorm (``fused=False``: no FusedBatchNorm node;
    the epsilon is a ``batchnorm/add/y`` constant), freshly initialised, saved with ``pca_folder``'s
    PCA files."""
    with tf.Graph().as_default():
        images = tf.compat.v1.placeholder(tf.float32, [1, None, None, 3], name="input")
        with arg_scope([layers.batch_norm], fused=False):
            network(images)
        tf.compat.v1.train.get_or_create_global_step()
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            builder = tf.compat.v1.saved_model.Builder(os.path.join(folder, "model"))
            builder.add_meta_graph_and_variables(sess, [tf.compat.v1.saved_model.tag_constants.SERVING])
            builder.save()
    shutil.copytree(pca_folder, os.path.join(folder, "pca"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--release", required=True, help="folder to write the release to (model/, pca/)")
    p.add_argument("--images", nargs="+", required=True, help="uint8 (H, W, 3) .npy images")
    p.add_argument("--out", required=True, help=".npz of the official outputs")
    p.add_argument("--pca_dim", type=int, default=40)
    p.add_argument("--max_feature_num", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unknown_release", help="also write a release of another model (DELG-like names) here")
    p.add_argument("--unfused_release", help="also write the network with unfused BatchNorms here")
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    tf.compat.v1.disable_eager_execution()

    image = tf.compat.v1.placeholder(tf.uint8, [None, None, 3], name="input_image")
    scale = tf.compat.v1.placeholder(tf.float32, [], name="input_scale")
    normalised = tf.expand_dims((tf.cast(image, tf.float32) - 128.0) / 128.0, 0)
    size = tf.cast(tf.round(tf.cast(tf.shape(image)[:2], tf.float32) * scale), tf.int32)
    resized = tf.compat.v1.image.resize_bilinear(normalised, size)  # TF1: no half-pixel centres
    features, attention = network(resized)
    tf.compat.v1.train.get_or_create_global_step()
    boxes_in = tf.compat.v1.placeholder(tf.float32, [None, 4])
    scores_in = tf.compat.v1.placeholder(tf.float32, [None])
    keep = tf.image.non_max_suppression(boxes_in, scores_in, args.max_feature_num, iou_threshold=1.0)

    with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        randomise(sess, rng)
        builder = tf.compat.v1.saved_model.Builder(os.path.join(args.release, "model"))
        builder.add_meta_graph_and_variables(sess, [tf.compat.v1.saved_model.tag_constants.SERVING])
        builder.save()

        dim = 1024
        projection = np.linalg.qr(rng.normal(size=(dim, dim)))[0].astype(np.float32)
        mean = rng.normal(0, 0.01, dim).astype(np.float32)
        variances = np.sort(rng.uniform(0.01, 1.0, dim))[::-1].astype(np.float32)
        os.makedirs(os.path.join(args.release, "pca"), exist_ok=True)
        for name, array in (("mean", mean), ("pca_proj_mat", projection), ("pca_vars", variances)):
            write_datum(os.path.join(args.release, "pca", f"{name}.datum"), array)

        out: dict[str, np.ndarray] = {}
        pixels = [np.load(path) for path in args.images]
        f1, a1 = sess.run([features, attention], {image: pixels[0], scale: 1.0})
        out["block3"], out["attention"] = f1[0], a1[0, :, :, 0]
        threshold = float(np.quantile(a1, 0.25))  # 3/4 of the cells of scale 1 pass: the selection matters
        out["threshold"] = np.float32(threshold)
        for index, px in enumerate(pixels):
            boxes, descs, scales, scores = [], [], [], []
            for s in SCALES:
                fmap, att = sess.run([features, attention], {image: px, scale: s})
                h, w = fmap.shape[1:3]
                ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
                points = np.stack([ys.ravel(), xs.ravel(), ys.ravel(), xs.ravel()], 1).astype(np.float32)
                rf_boxes = (STRIDE * points + np.float32([-PADDING, -PADDING, -PADDING + RF - 1, -PADDING + RF - 1]))
                rf_boxes = rf_boxes / np.float32(s)
                att = att.reshape(-1)
                chosen = np.flatnonzero(att >= threshold)
                boxes.append(rf_boxes[chosen])
                descs.append(fmap.reshape(-1, 1024)[chosen])
                scores.append(att[chosen])
                scales.append(np.full(len(chosen), 1.0 / s, np.float32))
            boxes_all, scores_all = np.concatenate(boxes), np.concatenate(scores)
            kept = sess.run(keep, {boxes_in: boxes_all, scores_in: scores_all})
            out[f"candidates{index}"] = np.int64(len(scores_all))
            desc = np.concatenate(descs)[kept]
            desc = desc / np.sqrt(np.maximum((desc ** 2).sum(1, keepdims=True), 1e-12))
            desc = (desc - mean) @ projection[:args.pca_dim].T
            desc = desc / np.sqrt(np.maximum((desc ** 2).sum(1, keepdims=True), 1e-12))
            chosen_boxes = boxes_all[kept]
            out[f"locations{index}"] = (chosen_boxes[:, :2] + chosen_boxes[:, 2:]) / 2  # (y, x)
            out[f"descriptors{index}"] = desc.astype(np.float32)
            out[f"scores{index}"] = scores_all[kept]
            out[f"scales{index}"] = np.concatenate(scales)[kept]
    np.savez(args.out, **out)
    if args.unknown_release:
        save_unknown_release(args.unknown_release)
    if args.unfused_release:
        save_unfused_release(args.unfused_release, os.path.join(args.release, "pca"))


if __name__ == "__main__":
    main()

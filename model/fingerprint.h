/* fingerprint.h — a model fingerprint: SHA-256 over the canonical config and
 * a chosen set of tensors, identical on every host that holds the same model.
 *
 * The router and each expert node compute it independently and compare it at
 * registration (docs/ARCHITECTURE.md, "Router ↔ expert wire": the Hello
 * carries it). The result depends only on content, never on layout:
 *   - the config is parsed and re-serialised with sorted keys, compact, so
 *     whitespace and key order do not matter (values do);
 *   - tensor names are sorted (strcmp) before hashing, so the caller's order
 *     does not matter; duplicates are an error;
 *   - a tensor contributes its name, safetensors dtype string, shape and
 *     bytes — not which shard or offset it sits at.
 * Hashed stream (version 1), all integers u64 little-endian:
 *   "medmoe-fingerprint-v1\n" flags  len(config) config  n
 *   per tensor: len(name) name  len(dtype) dtype  ndim shape[0..ndim)  nbytes  [bytes]
 * Cost: hashing reads every byte (~0.3–0.5 GB/s per core): an expert's
 * tensors (StableLM-2: 12 layers × 3 × 2048 × 5632 bf16 ≈ 830 MB) take a few
 * seconds. MM_FINGERPRINT_HEADERS_ONLY skips the bytes (names, dtypes and
 * shapes only) for a fast, weaker check; the flag is hashed too, so the two
 * kinds never compare equal.
 *
 *     char fp[MM_FINGERPRINT_HEX], err[256];
 *     int rc = mm_fingerprint_expert("/m/config.json", ck, &cfg, 2, 0, fp, err, sizeof err);
 */
#ifndef MM_FINGERPRINT_H
#define MM_FINGERPRINT_H

#include <stddef.h>

#include "config.h"
#include "hash.h"
#include "safetensors.h"

#define MM_FINGERPRINT_HEX MM_SHA256_HEX /* 64 hex digits + NUL */
#define MM_FINGERPRINT_HEADERS_ONLY 1u   /* flag: names/dtypes/shapes, not bytes */
/* How the weights are served (mm_weights, medmoe.h), hashed with the other
 * flags: a router serving int8 never takes an expert serving bf16. */
#define MM_FINGERPRINT_WEIGHTS(w) ((unsigned)(w) << 8)

/* "full" -> 0, "headers" -> MM_FINGERPRINT_HEADERS_ONLY (the --fingerprint
 * option of router and expert); MM_EINVAL for anything else. */
int mm_fingerprint_mode_parse(const char *s, unsigned *flags);

/* Fingerprint of a config.json text (config_json may be NULL with
 * config_len 0: no config) and the tensors named (n may be 0). Returns MM_OK,
 * MM_EPROTO (config not JSON), MM_ENOTFOUND (a tensor absent from ck),
 * MM_EINVAL (a name given twice) or MM_ENOMEM. */
int mm_fingerprint(const char *config_json, size_t config_len, const mm_checkpoint *ck,
                   const char *const *tensor_names, size_t n, unsigned flags,
                   char hex_out[MM_FINGERPRINT_HEX], char *err, size_t errlen);

/* The same, reading the config from a file. */
int mm_fingerprint_file(const char *config_path, const mm_checkpoint *ck,
                        const char *const *tensor_names, size_t n, unsigned flags,
                        char hex_out[MM_FINGERPRINT_HEX], char *err, size_t errlen);

/* Names of expert e's tensors in every MoE layer of cfg:
 * "model.layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.*".
 * *names_out is one malloc'd array (free() it) of pointers into ck; MM_ENOTFOUND
 * when a MoE layer has no tensor for e, MM_EINVAL when e is out of range. */
int mm_expert_tensor_names(const mm_checkpoint *ck, const mm_config *cfg, int expert,
                           const char ***names_out, size_t *n_out, char *err, size_t errlen);

/* Fingerprint of config_path + expert e's tensors: what an expert node sends
 * and what the router expects for e. */
int mm_fingerprint_expert(const char *config_path, const mm_checkpoint *ck, const mm_config *cfg,
                          int expert, unsigned flags, char hex_out[MM_FINGERPRINT_HEX], char *err,
                          size_t errlen);

/* The whole model's fingerprint, what a client is told it was answered by
 * (GetServerInfo.model_fingerprint, the PACS bridge's reports): SHA-256 of
 *   "medmoe-model-fingerprint-v1\n"  trunk  n_experts  expert_fps[0..n)
 * (hex strings, u64 little-endian lengths/counts as above), where trunk is the
 * fingerprint of config_path + every tensor that belongs to no routed expert
 * (embeddings, attention, dense MLPs, gates, meta expert, LM head, vision
 * tower) and expert_fps are mm_fingerprint_expert's, which the router has
 * already computed. So every byte is hashed once, and the same checkpoint gives
 * the same value on every host. MM_OK or the errors of mm_fingerprint. */
int mm_fingerprint_model(const char *config_path, const mm_checkpoint *ck, unsigned flags,
                         const char (*expert_fps)[MM_FINGERPRINT_HEX], int n_experts,
                         char hex_out[MM_FINGERPRINT_HEX], char *err, size_t errlen);

#endif

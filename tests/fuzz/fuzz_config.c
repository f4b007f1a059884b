/* fuzz_config — config.json from hostile bytes: the LLM config parser, the
 * CLIP vision config parser on the same bytes, and (when both accept) their
 * cross-check. Accepted configs must keep the invariants the model code
 * relies on (checked with assert, so a violation is a crash libFuzzer keeps). */
#include <assert.h>
#include <stdint.h>

#include "config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t len) {
    mm_config c;
    mm_vision_config v;
    char err[512];
    int rc = mm_config_parse((const char *)data, len, "config.json", &c, err, sizeof err);
    if (rc == MM_OK) {
        assert(c.hidden_size > 0 && c.num_attention_heads > 0 && c.head_dim > 0);
        assert(c.num_hidden_layers > 0 && c.num_hidden_layers <= MM_CONFIG_MAX_LAYERS);
        assert(c.n_moe_layers >= 0 && c.n_moe_layers <= MM_CONFIG_MAX_LAYERS);
        for (int l = 0; l < c.num_hidden_layers; l++) {
            int m = mm_config_is_moe_layer(&c, l);
            assert(m < c.n_moe_layers);
            if (m >= 0)
                assert(c.num_experts[m] >= 1 && c.num_experts[m] <= MM_CONFIG_MAX_EXPERTS);
        }
    }
    int vrc = mm_vision_config_parse((const char *)data, len, "config.json", &v, err, sizeof err);
    if (rc == MM_OK && vrc == MM_OK) {
        int layers = 0;
        if (mm_config_check_vision(&c, &v, &layers, err, sizeof err) == MM_OK)
            assert(layers >= 0 && layers <= v.num_hidden_layers);
    }
    return 0;
}

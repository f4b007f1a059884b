/* fuzz_safetensors — a safetensors file from hostile bytes: mm_st_open's
 * header checks (length, JSON, dtypes, shapes, offsets, __metadata__), then
 * every accessor over what it accepted. An accepted tensor must lie inside
 * the file with nbytes == nelem x element size: the harness reads its first
 * and last byte so ASan sees any escape from the mapping. */
#include <assert.h>

#include "fuzz_file.h"
#include "safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t len) {
    const char *path = mm_fuzz_file("fuzz.safetensors", data, len);
    mm_st_file *f = NULL;
    char err[512];
    if (mm_st_open(path, &f, err, sizeof err) == MM_OK) {
        volatile uint8_t sink = 0;
        for (size_t i = 0; i < mm_st_count(f); i++) {
            const mm_st_tensor *t = mm_st_at(f, i);
            assert(t && mm_st_find(f, t->name) != NULL);
            assert(t->nbytes == t->nelem * mm_st_dtype_size(t->st_dtype));
            assert(t->file_offset + t->nbytes <= len);
            if (t->nbytes) {
                sink ^= ((const uint8_t *)t->data)[0];
                sink ^= ((const uint8_t *)t->data)[t->nbytes - 1];
            }
            char shape[128];
            mm_st_shape_str(t, shape, sizeof shape);
        }
        for (size_t i = 0; i < mm_st_metadata_count(f); i++) {
            const char *k, *v;
            if (mm_st_metadata_at(f, i, &k, &v) == MM_OK)
                assert(mm_st_metadata(f, k) != NULL);
        }
        (void)sink;
        mm_st_destroy(&f);
    }
    unlink(path);
    return 0;
}

/* fuzz_image — PNG/JPEG from hostile bytes through model/image.c: the header
 * probe, the full decode (format from the magic bytes), the JPEG
 * DCT-scaled decode, and CLIP preprocessing of what decoded (padded and
 * plain, to a small side so one input stays fast). max_pixels is lowered to
 * 2^20 so a tiny file claiming a huge image is refused before its pixels are
 * paid for, as the router does with its own budget; the limit logic itself
 * is what is exercised. */
#include <assert.h>
#include <stdint.h>
#include <stdlib.h>

#include "image.h"
#include "status.h"

#define S_MAX_PIXELS ((size_t)1 << 20)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t len) {
    char err[512];
    size_t w = 0, h = 0;
    int prc = mm_image_probe(data, len, NULL, &w, &h, err, sizeof err);
    mm_image *img = NULL;
    int rc = mm_image_decode(data, len, NULL, S_MAX_PIXELS, &img, err, sizeof err);
    if (rc == MM_OK) {
        /* what decodes must have been probed, with the same size */
        assert(prc == MM_OK && img->width == w && img->height == h);
        float out[3 * 16 * 16];
        mm_image_params p;
        mm_image_params_default(&p, 16);
        for (int pad = 0; pad <= 1; pad++) {
            p.pad_to_square = pad;
            rc = mm_image_preprocess(img, &p, out, err, sizeof err);
            assert(rc == MM_OK);
        }
        mm_image_destroy(&img);
        /* the scaled path (JPEG only; a PNG decodes as above) */
        if (mm_image_decode_for(data, len, NULL, S_MAX_PIXELS, 4, &img, err, sizeof err) == MM_OK)
            mm_image_destroy(&img);
    }
    return 0;
}

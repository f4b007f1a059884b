/* test_image.c — model/image.c against the Python/PIL reference and against
 * hostile input.
 *
 * Usage: test_image <dir>   where <dir> was filled by
 *        tests/reference/image_ref.py gen <dir>  (manifest.txt + images +
 *        reference outputs).
 *
 * Tolerances: the decoded pixels, Pillow's BICUBIC resize and the final
 * normalised floats must all be bit-identical to the reference (the C code
 * reproduces Pillow's fixed-point resample and numpy's float32 arithmetic).
 * MM_IMAGE_TEST_TOL=<float> relaxes the float check (one 8-bit step after
 * the resize is 1/255/std ~= 0.015) for diagnosing a platform difference.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "image.h"
#include "status.h"

static const char *g_dir; /* test-data directory from argv (test only) */

/* ---- helpers ----------------------------------------------------------- */

static uint8_t *read_file(const char *name, size_t *n) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", g_dir, name);
    FILE *f = fopen(path, "rb");
    if (!f)
        fail_msg("cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = malloc(len > 0 ? (size_t)len : 1);
    assert_non_null(b);
    assert_int_equal(fread(b, 1, (size_t)len, f), (size_t)len);
    fclose(f);
    *n = (size_t)len;
    return b;
}

static mm_image *decode_file(const char *name) {
    size_t n;
    uint8_t *b = read_file(name, &n);
    mm_image *img = NULL;
    char err[256] = "";
    int rc = mm_image_decode(b, n, NULL, 0, &img, err, sizeof err);
    free(b);
    if (rc != MM_OK)
        fail_msg("%s: %s %s", name, mm_status_str(rc), err);
    return img;
}

/* Decode buf and expect status `want` with `needle` in the message. */
static void expect_error(const void *buf, size_t n, const char *media, size_t max_px, int want,
                         const char *needle) {
    mm_image *img = (mm_image *)0x1; /* must come back NULL */
    char err[512] = "";
    int rc = mm_image_decode(buf, n, media, max_px, &img, err, sizeof err);
    if (rc != want || !strstr(err, needle))
        fail_msg("want %s containing \"%s\", got %s \"%s\"", mm_status_str(want), needle,
                 mm_status_str(rc), err);
    assert_null(img);
}

static uint32_t crc32_of(const uint8_t *p, size_t n) {
    uint32_t c = 0xffffffffu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1)));
    }
    return c ^ 0xffffffffu;
}

static void put_be32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* Signature + IHDR(w, h, 8-bit RGB) with a valid CRC, nothing else: 33 bytes. */
static void png_header(uint8_t out[33], uint32_t w, uint32_t h) {
    static const uint8_t sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    memcpy(out, sig, 8);
    put_be32(out + 8, 13);
    memcpy(out + 12, "IHDR", 4);
    put_be32(out + 16, w);
    put_be32(out + 20, h);
    out[24] = 8; /* bit depth */
    out[25] = 2; /* RGB */
    out[26] = out[27] = out[28] = 0;
    put_be32(out + 29, crc32_of(out + 12, 17));
}

/* ---- against the reference --------------------------------------------- */

static void test_manifest(void **state) {
    (void)state;
    char path[1024];
    snprintf(path, sizeof path, "%s/manifest.txt", g_dir);
    FILE *f = fopen(path, "r");
    if (!f)
        fail_msg("cannot open %s (run image_ref.py gen first)", path);
    const char *tol_env = getenv("MM_IMAGE_TEST_TOL");
    double tol = tol_env ? atof(tol_env) : 0.0;
    char line[1024];
    int n_d = 0, n_p = 0, n_r = 0, n_e = 0, failures = 0;
    double worst = 0.0;
    while (fgets(line, sizeof line, f)) {
        char kind, name[256], ref[256], a[64], b[64];
        if (sscanf(line, "%c %255s %63s %63s %255s", &kind, name, a, b, ref) < 4)
            continue;
        if (kind == 'E') { /* expected refusal: E file STATUS substring */
            size_t n;
            uint8_t *buf = read_file(name, &n);
            int want = strcmp(a, "EUNSUPPORTED") == 0 ? MM_EUNSUPPORTED : MM_EPROTO;
            expect_error(buf, n, NULL, 0, want, b);
            free(buf);
            n_e++;
            continue;
        }
        mm_image *img = decode_file(name);
        size_t rn;
        uint8_t *rb = read_file(ref, &rn);
        if (kind == 'D') {
            size_t w = strtoul(a, NULL, 10), h = strtoul(b, NULL, 10);
            if (img->width != w || img->height != h || rn != w * h * 3 ||
                memcmp(img->rgb, rb, rn) != 0) {
                size_t diff = 0;
                for (size_t i = 0; i < rn && i < img->width * img->height * 3; i++)
                    diff += img->rgb[i] != rb[i];
                print_error("decode %s: %zux%zu vs %zux%zu, %zu bytes differ\n", name, img->width,
                            img->height, w, h, diff);
                failures++;
            }
            n_d++;
        } else if (kind == 'R') {
            size_t w = strtoul(a, NULL, 10), h = strtoul(b, NULL, 10);
            mm_image *o = NULL;
            char err[256];
            assert_int_equal(mm_image_resize_bicubic(img, w, h, &o, err, sizeof err), MM_OK);
            assert_int_equal(rn, w * h * 3);
            size_t diff = 0, maxd = 0;
            for (size_t i = 0; i < rn; i++) {
                size_t d = (size_t)abs((int)o->rgb[i] - (int)rb[i]);
                diff += d != 0;
                maxd = d > maxd ? d : maxd;
            }
            if (diff) {
                print_error("resize %s -> %zux%zu: %zu bytes differ (max %zu)\n", name, w, h, diff,
                            maxd);
                failures++;
            }
            mm_image_destroy(&o);
            n_r++;
        } else if (kind == 'P') {
            mm_image_params p;
            mm_image_params_default(&p, strtoul(a, NULL, 10));
            p.pad_to_square = atoi(b);
            size_t cnt = 3 * p.size * p.size;
            assert_int_equal(rn, cnt * sizeof(float));
            float *out = malloc(cnt * sizeof *out);
            assert_non_null(out);
            char err[256];
            int rc = mm_image_preprocess(img, &p, out, err, sizeof err);
            if (rc != MM_OK)
                fail_msg("preprocess %s: %s", name, err);
            double maxd = 0.0;
            size_t diff = 0;
            for (size_t i = 0; i < cnt; i++) {
                float r;
                memcpy(&r, rb + 4 * i, 4);
                double d = fabs((double)out[i] - (double)r);
                diff += d != 0.0;
                maxd = d > maxd ? d : maxd;
            }
            worst = maxd > worst ? maxd : worst;
            if (maxd > tol) {
                print_error("preprocess %s S=%zu pad=%d: %zu floats differ, max |diff| %g\n", name,
                            p.size, p.pad_to_square, diff, maxd);
                failures++;
            }
            free(out);
            n_p++;
        }
        free(rb);
        mm_image_destroy(&img);
    }
    fclose(f);
    print_message("manifest: %d decodes, %d resizes, %d preprocesses, %d refusals; "
                  "max |C - ref| on normalised floats = %g (tolerance %g)\n",
                  n_d, n_r, n_p, n_e, worst, tol);
    assert_true(n_d > 10 && n_p > 40 && n_r > 10 && n_e >= 1);
    assert_int_equal(failures, 0);
}

/* ---- hostile and broken input ------------------------------------------- */

static void test_bad_buffers(void **state) {
    (void)state;
    expect_error("", 0, NULL, 0, MM_EINVAL, "empty");
    expect_error(NULL, 10, NULL, 0, MM_EINVAL, "empty");
    const char *garbage = "hello world, not an image";
    expect_error(garbage, strlen(garbage), NULL, 0, MM_EUNSUPPORTED, "68 65 6c 6c 6f");
    expect_error(garbage, strlen(garbage), NULL, 0, MM_EUNSUPPORTED, "\"hello wo\"");
    expect_error("GIF89a\1\0\1\0", 10, NULL, 0, MM_EUNSUPPORTED, "GIF");
    expect_error("\xff\xd8", 2, NULL, 0, MM_EUNSUPPORTED, "broken JPEG");
    expect_error("\x89PNG", 4, NULL, 0, MM_EUNSUPPORTED, "broken PNG");
    uint8_t one = 0x42;
    expect_error(&one, 1, NULL, 0, MM_EUNSUPPORTED, "1 bytes");
    char err[128];
    assert_int_equal(mm_image_decode("x", 1, NULL, 0, NULL, err, sizeof err), MM_EINVAL);
}

static void test_media_type(void **state) {
    (void)state;
    size_t np, nj;
    uint8_t *png = read_file("rgb_37x23.png", &np);
    uint8_t *jpg = read_file("rgb_37x23.jpg", &nj);
    expect_error(png, np, "image/jpeg", 0, MM_EPROTO, "content, which is PNG");
    expect_error(jpg, nj, "image/png", 0, MM_EPROTO, "content, which is JPEG");
    expect_error(png, np, "image/gif", 0, MM_EUNSUPPORTED, "image/gif");
    mm_image *img = NULL;
    char err[256];
    assert_int_equal(mm_image_decode(png, np, "image/png", 0, &img, err, sizeof err), MM_OK);
    assert_int_equal(img->width, 37);
    mm_image_destroy(&img);
    assert_null(img);
    mm_image_destroy(&img); /* idempotent */
    assert_int_equal(mm_image_decode(jpg, nj, "image/jpg", 0, &img, err, sizeof err), MM_OK);
    assert_int_equal(img->height, 23);
    mm_image_destroy(&img);
    free(png);
    free(jpg);
}

static void test_limits(void **state) {
    (void)state;
    uint8_t h[33];
    /* 100000 x 100000: refused by the pixel limit from the header alone. */
    png_header(h, 100000, 100000);
    expect_error(h, sizeof h, NULL, 0, MM_EINVAL, "absurd dimensions");
    /* 60000 x 60000 is within the side limit: the pixel limit must refuse
     * it before the 10.8 GB buffer is allocated (ASan would abort). */
    png_header(h, 60000, 60000);
    expect_error(h, sizeof h, NULL, 0, MM_EINVAL, "exceeds the pixel limit");
    png_header(h, 64, 64);
    expect_error(h, sizeof h, "image/png", 64 * 64 - 1, MM_EINVAL, "4096 pixels exceeds");
    png_header(h, 70000, 1);
    expect_error(h, sizeof h, NULL, 0, MM_EINVAL, "absurd");
    png_header(h, 0, 0);
    expect_error(h, sizeof h, NULL, 0, MM_EPROTO, "empty image (0 x 0");
    png_header(h, 5, 0);
    expect_error(h, sizeof h, NULL, 0, MM_EPROTO, "empty image (5 x 0");
    /* Within limits but no image data: truncated. */
    png_header(h, 4, 4);
    expect_error(h, sizeof h, NULL, 0, MM_EPROTO, "truncated");
    /* The same limit on a JPEG: the 64x64 file with a tiny max_pixels. */
    size_t n;
    uint8_t *jpg = read_file("rgb_64x64_q75.jpg", &n);
    expect_error(jpg, n, NULL, 1000, MM_EINVAL, "exceeds the pixel limit");
    free(jpg);
}

static void test_corrupt(void **state) {
    (void)state;
    size_t n;
    uint8_t *png = read_file("rgb_64x64.png", &n);
    /* A flipped byte inside the IDAT payload: zlib notices first. */
    png[60] ^= 0x55;
    expect_error(png, n, NULL, 0, MM_EPROTO, "PNG: corrupt or truncated data: IDAT");
    png[60] ^= 0x55;
    /* A flipped byte in the (single) IDAT's CRC, just before IEND. */
    png[n - 14] ^= 0x55;
    expect_error(png, n, NULL, 0, MM_EPROTO, "CRC");
    png[n - 14] ^= 0x55;
    /* A broken IHDR CRC. */
    png[30] ^= 1;
    expect_error(png, n, NULL, 0, MM_EPROTO, "PNG: corrupt");
    png[30] ^= 1;
    free(png);

    uint8_t *jpg = read_file("rgb_37x23.jpg", &n);
    jpg[n - 1] = 0; /* EOI gone: libjpeg reports premature end */
    expect_error(jpg, n - 2, NULL, 0, MM_EPROTO, "Premature end");
    free(jpg);
}

/* Decode every prefix and many single-byte corruptions: no crash, no leak
 * (ASan), and a prefix that cuts into the image data must fail. */
static void fuzz_file(const char *name, size_t tail_ok) {
    size_t n;
    uint8_t *b = read_file(name, &n);
    uint8_t *copy = malloc(n);
    assert_non_null(copy);
    char err[512];
    size_t failed = 0, ok = 0;
    for (size_t len = 0; len < n; len++) {
        uint8_t *exact = malloc(len ? len : 1); /* exact size: ASan sees over-reads */
        memcpy(exact, b, len);
        mm_image *img = NULL;
        int rc = mm_image_decode(exact, len, NULL, 0, &img, err, sizeof err);
        if (rc == MM_OK) {
            ok++;
            if (len + tail_ok < n)
                fail_msg("%s cut at %zu of %zu bytes decoded OK", name, len, n);
        } else {
            failed++;
            assert_null(img);
            assert_true(err[0] != '\0');
        }
        mm_image_destroy(&img);
        free(exact);
    }
    for (size_t i = 0; i < n; i++) { /* flip each byte in turn */
        memcpy(copy, b, n);
        copy[i] ^= (uint8_t)(0x5a + i);
        mm_image *img = NULL;
        int rc = mm_image_decode(copy, n, NULL, 0, &img, err, sizeof err);
        if (rc == MM_OK) {
            assert_true(img->width > 0 && img->height > 0);
            ok++;
        } else {
            failed++;
        }
        mm_image_destroy(&img);
    }
    print_message("fuzz %s (%zu bytes): %zu refused, %zu decoded\n", name, n, failed, ok);
    free(copy);
    free(b);
}

static void test_fuzz_png(void **state) {
    (void)state;
    /* IEND (12 bytes) is not read, like PIL; anything shorter must fail. */
    fuzz_file("rgb_37x23.png", 12);
    fuzz_file("palette_trns_29x41.png", 12);
}

static void test_fuzz_jpeg(void **state) {
    (void)state;
    fuzz_file("rgb_37x23.jpg", 0);
    fuzz_file("prog_100x7.jpg", 0);
}

static void test_load_file(void **state) {
    (void)state;
    char path[1024], err[512];
    mm_image *img = NULL;
    snprintf(path, sizeof path, "%s/grey_23x37.png", g_dir);
    assert_int_equal(mm_image_load_file(path, 0, &img, err, sizeof err), MM_OK);
    assert_int_equal(img->width, 23);
    assert_int_equal(img->height, 37);
    mm_image_destroy(&img);
    snprintf(path, sizeof path, "%s/no-such-file.png", g_dir);
    assert_int_equal(mm_image_load_file(path, 0, &img, err, sizeof err), MM_ENOTFOUND);
    assert_non_null(strstr(err, "no-such-file.png"));
    snprintf(path, sizeof path, "%s/manifest.txt", g_dir);
    assert_int_equal(mm_image_load_file(path, 0, &img, err, sizeof err), MM_EUNSUPPORTED);
    assert_non_null(strstr(err, "manifest.txt: image: neither PNG nor JPEG"));
    assert_null(img);
}

static void test_params(void **state) {
    (void)state;
    mm_image_params p;
    mm_image_params_default(&p, 336);
    assert_int_equal(p.pad_rgb[0], 122);
    assert_int_equal(p.pad_rgb[1], 116);
    assert_int_equal(p.pad_rgb[2], 104);
    assert_int_equal(p.pad_to_square, 1);
    mm_image *img = NULL;
    char err[256];
    assert_int_equal(mm_image_new(5, 3, &img, err, sizeof err), MM_OK);
    float out[3 * 4 * 4];
    p.size = 0;
    assert_int_equal(mm_image_preprocess(img, &p, out, err, sizeof err), MM_EINVAL);
    p.size = 4;
    p.std[1] = 0;
    assert_int_equal(mm_image_preprocess(img, &p, out, err, sizeof err), MM_EINVAL);
    assert_non_null(strstr(err, "channel 1"));
    mm_image_params_default(&p, 4);
    assert_int_equal(mm_image_preprocess(img, &p, out, err, sizeof err), MM_OK);
    assert_int_equal(mm_image_preprocess(NULL, &p, out, err, sizeof err), MM_EINVAL);
    /* A 1-pixel-high strip padded to a 60000-wide square: the canvas is never
     * built, so this stays cheap (it would be 10.8 GB materialised). */
    mm_image *strip = NULL;
    assert_int_equal(mm_image_new(60000, 1, &strip, err, sizeof err), MM_OK);
    memset(strip->rgb, 255, 60000 * 3);
    mm_image_params_default(&p, 4);
    assert_int_equal(mm_image_preprocess(strip, &p, out, err, sizeof err), MM_OK);
    /* All pad colour except the thin white line in the middle rows. */
    float pad0 = ((float)(122.0 / 255.0) - p.mean[0]) / p.std[0];
    assert_true(fabsf(out[0] - pad0) < 1e-6f);
    mm_image_destroy(&strip);
    mm_image_destroy(&img);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s <test-data dir from image_ref.py gen>\n", argv[0]);
        return 2;
    }
    g_dir = argv[1];
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_manifest),   cmocka_unit_test(test_bad_buffers),
        cmocka_unit_test(test_media_type), cmocka_unit_test(test_limits),
        cmocka_unit_test(test_corrupt),    cmocka_unit_test(test_fuzz_png),
        cmocka_unit_test(test_fuzz_jpeg),  cmocka_unit_test(test_load_file),
        cmocka_unit_test(test_params),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

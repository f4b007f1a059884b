/* bench_dicom.c — DICOM decode + display pipeline (model/dicom.h) beside the
 * PNG path (image.h) for an image of the same size, measured in the same run:
 * a 512 x 512 CT slice, a 3000 x 3000 X-ray (12-bit, MONOCHROME1) and a
 * 2048 x 2048 JPEG 2000, each as DICOM -> RGB and as PNG -> RGB; then, for
 * both, the CLIP preprocessing to 336 x 336 that follows either way.
 *
 *   bench_dicom DIR [runs]     DIR: bench/dicom/make_images.py's output
 *
 * Prints the median of `runs` (default 5) wall-clock times per step; never
 * fails (a missing file is reported and skipped). */
#include "clock.h"
#include "dicom.h"
#include "image.h"
#include "status.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int s_cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Median of runs timings of one decode; 0 and a message when it fails. */
static double s_time(const uint8_t *b, size_t n, int dicom, int runs, size_t *w, size_t *h,
                     double *prep_ms) {
    double t[64], p[64];
    char err[512];
    for (int i = 0; i < runs; i++) {
        mm_image *img = NULL;
        double t0 = mm_now_ms();
        int rc = dicom ? mm_dicom_decode(b, n, NULL, 0, &img, err, sizeof err)
                       : mm_image_decode(b, n, NULL, 0, &img, err, sizeof err);
        t[i] = mm_now_ms() - t0;
        if (rc != MM_OK) {
            printf("  decode failed: %s: %s\n", mm_status_str(rc), err);
            return 0;
        }
        *w = img->width;
        *h = img->height;
        mm_image_params ip;
        mm_image_params_default(&ip, 336);
        float *px = malloc(3 * 336 * 336 * sizeof *px);
        t0 = mm_now_ms();
        if (px)
            mm_image_preprocess(img, &ip, px, err, sizeof err);
        p[i] = mm_now_ms() - t0;
        free(px);
        mm_image_destroy(&img);
    }
    qsort(t, (size_t)runs, sizeof t[0], s_cmp);
    qsort(p, (size_t)runs, sizeof p[0], s_cmp);
    *prep_ms = p[runs / 2];
    return t[runs / 2];
}

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help")) {
        printf("usage: bench_dicom DIR [runs]\n"
               "DICOM decode + windowing beside PNG decode of the same size (median ms).\n");
        return argc < 2;
    }
    int runs = argc > 2 ? atoi(argv[2]) : 5;
    if (runs < 1 || runs > 64)
        runs = 5;
    static const struct {
        const char *name, *what;
    } cases[] = {{"ct512", "512 x 512 CT, int16 + rescale + window, explicit LE"},
                 {"xray3000", "3000 x 3000 X-ray, 12-bit MONOCHROME1 + window, explicit LE"},
                 {"j2k2048", "2048 x 2048, 12-bit, JPEG 2000 lossless (GDCM/OpenJPEG)"}};
    printf("bench_dicom: median of %d runs, one thread; DICOM -> RGB (parse, decode, modality +\n"
           "VOI LUT) beside PNG -> RGB (libpng) of the same size; then CLIP preprocessing.\n",
           runs);
    printf("%-10s %-58s %12s %12s %8s %12s\n", "image", "", "DICOM ms", "PNG ms", "ratio",
           "prep ms");
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        char path[4096], err[512];
        uint8_t *dcm = NULL, *png = NULL;
        size_t nd = 0, np = 0, w = 0, h = 0, pw = 0, ph = 0;
        double prep = 0, pprep = 0;
        snprintf(path, sizeof path, "%s/%s.dcm", argv[1], cases[k].name);
        if (mm_image_read_file(path, &dcm, &nd, err, sizeof err) != MM_OK) {
            printf("%-10s skipped: %s\n", cases[k].name, err);
            continue;
        }
        snprintf(path, sizeof path, "%s/%s.png", argv[1], cases[k].name);
        if (mm_image_read_file(path, &png, &np, err, sizeof err) != MM_OK) {
            printf("%-10s skipped: %s\n", cases[k].name, err);
            free(dcm);
            continue;
        }
        double td = s_time(dcm, nd, 1, runs, &w, &h, &prep);
        double tp = s_time(png, np, 0, runs, &pw, &ph, &pprep);
        printf("%-10s %-58s %12.1f %12.1f %7.2fx %12.1f\n", cases[k].name, cases[k].what, td, tp,
               tp > 0 ? td / tp : 0, prep);
        printf("%-10s   %zu x %zu from %.1f MB of DICOM, %.1f MB of PNG; %.0f Mpixel/s DICOM\n", "",
               w, h, nd / 1e6, np / 1e6, td > 0 ? (double)(w * h) / td / 1e3 : 0);
        free(dcm);
        free(png);
    }
    return 0;
}

/* dicom_dump.c — decode one DICOM file through model/dicom.h and write the
 * RGB result as a binary PPM, for the pydicom oracle (tests/dicom/oracle.py)
 * and for people looking at what medmoe sees.
 *
 *   mm-dicom-dump FILE [--window NAME] [--frame N] [--max-pixels N] > out.ppm
 *   mm-dicom-dump --probe FILE      header facts, one "key value" a line
 *
 * Exit 0 on success; 2 with "STATUS: message" on stderr when the file is
 * refused; 1 for bad arguments. */
#include "dicom.h"
#include "image.h"
#include "status.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int usage(FILE *to) {
    fprintf(to, "usage: mm-dicom-dump FILE [--window auto|full|lung|mediastinum|bone|brain] "
                "[--frame N] [--max-pixels N] > out.ppm\n"
                "       mm-dicom-dump --probe FILE\n"
                "Decodes a DICOM image as medmoe does (modality LUT, VOI LUT, colour, frame)\n"
                "and writes it as a binary PPM on stdout.\n");
    return to == stdout ? 0 : 1;
}

int main(int argc, char **argv) {
    const char *path = NULL;
    int probe = 0;
    size_t max_pixels = 0;
    mm_dicom_options o;
    mm_dicom_options_default(&o);
    char err[1024];
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h"))
            return usage(stdout);
        if (!strcmp(argv[i], "--probe")) {
            probe = 1;
        } else if (!strcmp(argv[i], "--window") && i + 1 < argc) {
            if (mm_dicom_window_parse(argv[++i], &o.window, err, sizeof err) != MM_OK) {
                fprintf(stderr, "mm-dicom-dump: %s\n", err);
                return 1;
            }
        } else if (!strcmp(argv[i], "--frame") && i + 1 < argc) {
            o.frame = (uint32_t)strtoul(argv[++i], NULL, 10);
        } else if (!strcmp(argv[i], "--max-pixels") && i + 1 < argc) {
            max_pixels = (size_t)strtoull(argv[++i], NULL, 10);
        } else if (argv[i][0] != '-' && !path) {
            path = argv[i];
        } else {
            return usage(stderr);
        }
    }
    if (!path)
        return usage(stderr);
    uint8_t *bytes = NULL;
    size_t len = 0;
    int rc = mm_image_read_file(path, &bytes, &len, err, sizeof err);
    if (rc == MM_OK && probe) {
        mm_dicom_info in;
        rc = mm_dicom_probe(bytes, len, &in, err, sizeof err);
        if (rc == MM_OK)
            printf("cols %zu\nrows %zu\nframes %zu\ndecode_pixels %zu\nsamples %u\n"
                   "bits_allocated %u\nbits_stored %u\nsigned %d\nencapsulated %d\n"
                   "photometric %s\nmodality %s\ntransfer_syntax %s\n",
                   in.cols, in.rows, in.frames, in.decode_pixels, in.samples, in.bits_allocated,
                   in.bits_stored, in.is_signed, in.encapsulated, in.photometric, in.modality,
                   in.transfer_syntax);
    } else if (rc == MM_OK) {
        mm_image *img = NULL;
        rc = mm_dicom_decode(bytes, len, &o, max_pixels, &img, err, sizeof err);
        if (rc == MM_OK) {
            printf("P6\n%zu %zu\n255\n", img->width, img->height);
            fwrite(img->rgb, 3, img->width * img->height, stdout);
        }
        mm_image_destroy(&img);
    }
    free(bytes);
    if (rc != MM_OK) {
        fprintf(stderr, "%s: %s\n", mm_status_str(rc), err);
        return 2;
    }
    return 0;
}

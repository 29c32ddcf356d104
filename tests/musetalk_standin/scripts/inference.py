"""Stand-in for MuseTalk's scripts/inference.py (0a89dec): the same flags, task loop over the
inference YAML, decode loop (lines 199-206) and second blending loop (lines 208-227).

Generated frame count comes from the "audio": the file at audio_path holds a number of frames.
Blended frames are written as PNGs to <result_dir>/<version>/<video>_<audio>/, and kept there
(MuseTalk makes a video of them and deletes them), so that tests can read every frame.
"""
import argparse
import copy
import glob
import os

import cv2
import numpy as np
from omegaconf import OmegaConf

from musetalk.utils.blending import get_image
from musetalk.utils.preprocessing import get_landmark_and_bbox
from musetalk.utils.utils import datagen, load_all_model


def main(args):
    vae, unet, pe = load_all_model(unet_model_path=args.unet_model_path, vae_type=args.vae_type,
                                   unet_config=args.unet_config)
    timesteps = np.zeros(1)
    inference_config = OmegaConf.load(args.inference_config)
    print("Loaded inference config:", inference_config)

    for task_id in inference_config:
        try:
            video_path = inference_config[task_id]["video_path"]
            audio_path = inference_config[task_id]["audio_path"]
            input_basename = os.path.basename(video_path.rstrip("/")).split(".")[0]
            audio_basename = os.path.basename(audio_path).split(".")[0]
            temp_dir = os.path.join(args.result_dir, args.version)
            result_img_save_path = os.path.join(temp_dir, f"{input_basename}_{audio_basename}")
            os.makedirs(result_img_save_path, exist_ok=True)

            input_img_list = sorted(glob.glob(os.path.join(video_path, "*.png")))
            with open(audio_path, encoding="utf-8") as handle:
                video_num = int(handle.read().strip())
            whisper_chunks = [np.array([k], dtype=np.float32) for k in range(video_num)]

            coord_list, frame_list = get_landmark_and_bbox(input_img_list, args.bbox_shift)
            input_latent_list = []
            for bbox, frame in zip(coord_list, frame_list):
                x1, y1, x2, y2 = bbox
                crop_frame = cv2.resize(frame[y1:y2, x1:x2], (256, 256),
                                        interpolation=cv2.INTER_LANCZOS4)
                input_latent_list.append(vae.get_latents_for_unet(crop_frame))

            frame_list_cycle = frame_list + frame_list[::-1]
            coord_list_cycle = coord_list + coord_list[::-1]
            input_latent_list_cycle = input_latent_list + input_latent_list[::-1]

            batch_size = args.batch_size
            gen = datagen(whisper_chunks=whisper_chunks, vae_encode_latents=input_latent_list_cycle,
                          batch_size=batch_size, delay_frame=0)
            res_frame_list = []
            for i, (whisper_batch, latent_batch) in enumerate(gen):
                audio_feature_batch = pe(whisper_batch)
                latent_batch = latent_batch.astype(unet.model.dtype)
                pred_latents = unet.model(latent_batch, timesteps,
                                          encoder_hidden_states=audio_feature_batch).sample
                recon = vae.decode_latents(pred_latents)
                for res_frame in recon:
                    res_frame_list.append(res_frame)

            for i, res_frame in enumerate(res_frame_list):
                bbox = coord_list_cycle[i % (len(coord_list_cycle))]
                ori_frame = copy.deepcopy(frame_list_cycle[i % (len(frame_list_cycle))])
                x1, y1, x2, y2 = bbox
                try:
                    res_frame = cv2.resize(res_frame.astype(np.uint8), (x2 - x1, y2 - y1))
                except:  # noqa: E722 - MuseTalk skips a frame it cannot resize, silently
                    continue
                combine_frame = get_image(ori_frame, res_frame, [x1, y1, x2, y2], mode=args.parsing_mode)
                cv2.imwrite(f"{result_img_save_path}/{str(i).zfill(8)}.png", combine_frame)
            print(f"Results saved to {result_img_save_path}")
        except Exception as e:
            print("Error occurred during processing:", e)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--ffmpeg_path", type=str, default="./ffmpeg-4.4-amd64-static/")
    parser.add_argument("--gpu_id", type=int, default=0)
    parser.add_argument("--vae_type", type=str, default="sd-vae")
    parser.add_argument("--unet_config", type=str, default="./models/musetalk/config.json")
    parser.add_argument("--unet_model_path", type=str, default="./models/musetalkV15/unet.pth")
    parser.add_argument("--whisper_dir", type=str, default="./models/whisper")
    parser.add_argument("--inference_config", type=str, default="configs/inference/test_img.yaml")
    parser.add_argument("--bbox_shift", type=int, default=0)
    parser.add_argument("--result_dir", default="./results")
    parser.add_argument("--extra_margin", type=int, default=10)
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--audio_padding_length_left", type=int, default=2)
    parser.add_argument("--audio_padding_length_right", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--output_vid_name", type=str, default=None)
    parser.add_argument("--use_saved_coord", action="store_true")
    parser.add_argument("--saved_coord", action="store_true")
    parser.add_argument("--use_float16", action="store_true")
    parser.add_argument("--parsing_mode", default="jaw")
    parser.add_argument("--left_cheek_width", type=int, default=90)
    parser.add_argument("--right_cheek_width", type=int, default=90)
    parser.add_argument("--version", type=str, default="v15", choices=["v1", "v15"])
    args = parser.parse_args()
    main(args)
